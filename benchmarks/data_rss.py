"""Anonymous memory while iterating a packed dataset larger than typical RAM budgets.

Writes a fixed-shape dataset (uint8 3x224x224 "images", ~150 KB each, plus an int64 label) of about
4.2 GB (``--quick``: ~0.5 GB) into a temporary directory under /tmp, then iterates it twice through
``DataLoader(num_workers=0, batch_size=64)`` -- once in order, once shuffled -- summing every batch
so every byte is read. RSS is read from ``/proc/self/status`` after every batch:

- ``rss_anon_growth_mb`` (headline, target < 300): peak ``RssAnon`` during iteration minus ``RssAnon``
  just before it. Anonymous memory is what the process really owns; the reader's copy-on-write
  mapping of the data file adds only file-backed pages, which the kernel can reclaim.
- ``rss_file_growth_mb`` (informational): the same for ``RssFile`` (mapped pages of the data file that
  happen to be resident; bounded by the page cache, not by the process).

The two passes must agree on the byte sum (a correctness check). The data is deleted at the end.
Memory figures are RSS deltas from /proc (BENCHMARKING.md, rule 7), one run, no ratios.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import figure, log, record, run_benchmark

BENCH = "data_rss"
THREADS = (1,)

SHAPE = (3, 224, 224)
SAMPLE_BYTES = 3 * 224 * 224
MIN_FREE = 10 * 10**9


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from torchkiln.data.indexed import IndexedDataset, write_indexed_dataset

    quick = args.quick
    target_bytes = int(0.5e9) if quick else int(4.2e9)
    n = target_bytes // SAMPLE_BYTES
    tmp_root = Path("/tmp")
    free = shutil.disk_usage(tmp_root).free
    if free < MIN_FREE:
        raise SystemExit(
            f"[{BENCH}] needs >= {MIN_FREE / 1e9:.0f} GB free under {tmp_root} (the writer holds the data "
            f"twice while finalizing); only {free / 1e9:.1f} GB free"
        )
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-rss-", dir=tmp_root))
    try:
        # Samples are windows of one 16 MiB random buffer at varying offsets: cheap to produce, and
        # every sample differs. The writer streams them; nothing big is kept in this process.
        rng = np.random.default_rng(0)
        pool = rng.integers(0, 256, size=16 << 20, dtype=np.uint8)
        span = len(pool) - SAMPLE_BYTES

        def samples():
            for i in range(n):
                off = (i * 7919 * 64) % span
                yield {"image": pool[off : off + SAMPLE_BYTES].reshape(SHAPE), "label": i % 1000}

        log(
            f"[{BENCH}] writing {n} samples x {SAMPLE_BYTES / 1e3:.0f} KB = {n * SAMPLE_BYTES / 1e9:.2f} GB "
            f"into {tmp} ({free / 1e9:.0f} GB free) ..."
        )
        t0 = time.perf_counter()
        write_indexed_dataset(
            tmp / "images", samples(), {"image": ("uint8", SHAPE), "label": "int64"}, checksums=False
        )
        write_s = time.perf_counter() - t0
        pool = None  # the generator's buffer: free it before measuring (the closure still names it)
        ds = IndexedDataset(tmp / "images")
        data_bytes = ds.nbytes
        log(f"[{BENCH}] wrote {data_bytes / 1e9:.2f} GB in {write_s:.1f} s")

        batch = 64
        passes = {
            "sequential": DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0),
            "random": DataLoader(
                ds, batch_size=batch, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0)
            ),
        }
        base = _status_kb()
        peak_anon = base["RssAnon"]
        peak_file = base["RssFile"]
        results: dict[str, Any] = {}
        for name, loader in passes.items():
            t0 = time.perf_counter()
            total = 0
            labels = 0
            seen = 0
            for b in loader:
                img = b["image"]
                total += int(img.sum(dtype=torch.int64))
                labels += int(b["label"].sum())
                seen += img.shape[0]
                st = _status_kb()
                peak_anon = max(peak_anon, st["RssAnon"])
                peak_file = max(peak_file, st["RssFile"])
                del img, b
            secs = time.perf_counter() - t0
            assert seen == len(ds), (seen, len(ds))
            results[name] = {
                "byte_sum": total,
                "label_sum": labels,
                "s": secs,
                "gb_per_s": data_bytes / secs / 1e9,
            }
            log(
                f"[{BENCH}] {name}: {secs:.1f} s ({data_bytes / secs / 1e9:.2f} GB/s), "
                f"RssAnon peak +{(peak_anon - base['RssAnon']) / 1024:.1f} MB, "
                f"RssFile peak +{(peak_file - base['RssFile']) / 1024:.1f} MB"
            )
        end = _status_kb()
        same = (
            results["sequential"]["byte_sum"] == results["random"]["byte_sum"]
            and results["sequential"]["label_sum"] == results["random"]["label_sum"]
        )
        if not same:
            raise AssertionError(f"the two passes read different data: {results}")
        ds.close()
        del ds, passes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    anon_mb = (peak_anon - base["RssAnon"]) / 1024
    file_mb = (peak_file - base["RssFile"]) / 1024
    figures = [
        figure(
            "rss_anon_growth_mb",
            anon_mb,
            "< 300",
            rounds=1,
            unit="MB",
            note=f"peak RssAnon over both passes minus before; data {data_bytes / 1e9:.2f} GB",
        ),
        figure(
            "rss_file_growth_mb",
            file_mb,
            None,
            rounds=1,
            unit="MB",
            note="peak RssFile minus before (resident pages of the mapped data file; reclaimable)",
        ),
        figure(
            "seq_gb_per_s",
            results["sequential"]["gb_per_s"],
            None,
            rounds=1,
            unit="GB/s",
            note="sequential pass, warm-ish page cache, fetch + collate + sum",
        ),
        figure(
            "random_gb_per_s",
            results["random"]["gb_per_s"],
            None,
            rounds=1,
            unit="GB/s",
            note="shuffled pass",
        ),
    ]
    return record(
        BENCH,
        figures,
        note=(
            f"{n} samples uint8{SHAPE} + int64 label, {data_bytes / 1e9:.2f} GB, DataLoader(num_workers=0, "
            f"batch_size={batch}), sequential then shuffled, every batch summed; RSS from /proc/self/status"
        ),
        quick=bool(quick),
        data_gb=data_bytes / 1e9,
        samples=n,
        batch_size=batch,
        write_s=write_s,
        rss_anon_before_mb=base["RssAnon"] / 1024,
        rss_anon_after_mb=end["RssAnon"] / 1024,
        byte_sums_match=same,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__)


if __name__ == "__main__":
    main()
