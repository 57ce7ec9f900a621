"""Thread safety of the indexed reader: 8 threads read random indices of one shared ``IndexedDataset``
with ``sys.setswitchinterval(1e-5)`` (a thread switch every 10 us), and every result is compared with
what was written. ``wrong_reads`` (target 0) counts mismatches. ``seek_read_wrong_reads`` runs the
same with one shared file object doing seek + read per sample: the pair is not atomic, so another
thread's seek can land between them (informational: it shows why the reader has no file position).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks._common import figure, log, record, run_benchmark

BENCH = "data_threads"
THREADS = (1,)


def _hammer(read, expected: list[bytes], n_threads: int, reads: int) -> int:
    import numpy as np

    wrong = [0] * n_threads

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        for i in rng.integers(0, len(expected), size=reads).tolist():
            if read(i) != expected[i]:
                wrong[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(wrong)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from torchkiln.data.indexed import IndexedDataset, write_indexed_dataset

    n, n_threads = 2000, 8
    reads = 2000 if args.quick else 20000
    rng = np.random.default_rng(0)
    expected = [
        rng.integers(0, 256, size=int(rng.integers(1, 300)), dtype=np.uint8).tobytes() for _ in range(n)
    ]
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-threads-"))
    write_indexed_dataset(tmp / "t", ({"tokens": np.frombuffer(e, np.uint8)} for e in expected))
    ds = IndexedDataset(tmp / "t")
    blob = tmp / "plain.bin"
    blob.write_bytes(b"".join(expected))
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in expected])]).tolist()
    fh = open(blob, "rb", buffering=0)  # noqa: SIM115

    def seek_read(i: int) -> bytes:
        fh.seek(offsets[i])
        return fh.read(offsets[i + 1] - offsets[i])

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        log(f"[{BENCH}] {n_threads} threads x {reads} reads, indexed reader ...")
        wrong = _hammer(lambda i: ds[i]["tokens"].numpy().tobytes(), expected, n_threads, reads)
        wrong_batched = _hammer(
            lambda i: ds.__getitems__([i, (i + 1) % n])[0]["tokens"].numpy().tobytes(),
            expected,
            n_threads,
            reads // 2,
        )
        log(f"[{BENCH}] same with a shared seek + read file ...")
        wrong_seek = _hammer(seek_read, expected, n_threads, reads)
    finally:
        sys.setswitchinterval(old)
        fh.close()
    total = n_threads * reads
    figures = [
        figure("wrong_reads", float(wrong), "<= 0", note=f"of {total} reads by {n_threads} threads"),
        figure(
            "wrong_reads_getitems", float(wrong_batched), "<= 0", note=f"of {total // 2} __getitems__ calls"
        ),
        figure(
            "seek_read_wrong_reads",
            float(wrong_seek),
            None,
            note=f"of {total}; shared file object, seek + read",
        ),
    ]
    return record(BENCH, figures, note="switch interval 1e-5 s", quick=bool(args.quick), reads=total)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__)


if __name__ == "__main__":
    main()
