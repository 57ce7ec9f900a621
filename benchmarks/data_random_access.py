"""Random access into the memory-mapped indexed dataset (warm page cache).

Two corpora: the standard library's ``.py`` files as byte tokens (one variable-length sample per file)
and synthetic uint8 3x32x32 images with int64 labels. Every figure is a median of per-pair ratios
from ``interleaved_ratio`` (A = baseline, B = ``IndexedDataset``; above 1 means ours is faster):

- ``vs_memory``: collated batches (64 random indices, tokens padded into one tensor) from
  ``IndexedDataset.get_batch`` against the same samples held as an in-memory list of tensors
  (``pad_sequence`` / ``torch.stack``). Headline: the token corpus; ``vs_memory_images`` too.
- ``vs_seek_read``: single-sample reads (``ds[i]``, 256 random indices) against a reader that keeps
  one open file and does seek + read + ``torch.frombuffer`` per sample.
- ``vs_hf_datasets``: single-sample reads against Hugging Face ``datasets`` (``load_from_disk``,
  memory-mapped Arrow, numpy format; skipped when it is not installed).
- ``batched_vs_single``: a collated batch from one ``ds.__getitems__(idx)`` call (what DataLoader does
  when a dataset has it; ``collate_samples`` keeps the gathered columns) against
  ``default_collate([ds[i] for i in idx])``; images+labels (headline) and the token corpus.
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import figure, log, ratio_spread, record, run_benchmark

BENCH = "data_random_access"
THREADS = (1,)


def _stdlib_files(limit: int | None) -> list[bytes]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    out = []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if data:
            out.append(data)
        if limit and len(out) >= limit:
            break
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from torchkiln.data.indexed import IndexedDataset, write_indexed_dataset
    from torchkiln.measure import interleaved_ratio

    quick = args.quick
    pairs = (5, 10) if quick else (10, 40)
    max_time = 4.0 if quick else 20.0
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-data-"))
    texts = _stdlib_files(800 if quick else None)
    log(f"[{BENCH}] packing {len(texts)} stdlib files ({sum(map(len, texts)) / 1e6:.1f} MB) ...")
    write_indexed_dataset(
        tmp / "code", ({"tokens": np.frombuffer(t, np.uint8)} for t in texts), {"tokens": ("uint8", (None,))}
    )
    n_img = 2000 if quick else 20000
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_img, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_img)
    write_indexed_dataset(
        tmp / "img",
        ({"image": images[i], "label": labels[i]} for i in range(n_img)),
        {"image": ("uint8", (3, 32, 32)), "label": "int64"},
    )
    code = IndexedDataset(tmp / "code")
    img = IndexedDataset(tmp / "img")
    mem_code = [torch.frombuffer(bytearray(t), dtype=torch.uint8) for t in texts]
    mem_img = [torch.from_numpy(images[i].copy()) for i in range(n_img)]
    for i in range(len(code)):  # warm the page cache and check the content once
        assert code[i]["tokens"].numel() == len(texts[i])
    batch = 64
    gen = np.random.default_rng(1)

    def idx_for(n: int) -> np.ndarray:
        return gen.integers(0, n, size=batch)

    def cmp(a, b) -> Any:
        return interleaved_ratio(a, b, warmup=2, min_pairs=pairs[0], max_pairs=pairs[1], max_time_s=max_time)

    figures = []
    # (a) collated batches vs in-memory list
    reps = 20
    log(f"[{BENCH}] (a) collated batches vs in-memory ...")
    a_code = cmp(
        lambda: [
            pad_sequence([mem_code[i] for i in idx_for(len(texts))], batch_first=True) for _ in range(reps)
        ],
        lambda: [code.get_batch(idx_for(len(texts))) for _ in range(reps)],
    )
    a_img = cmp(
        lambda: [torch.stack([mem_img[i] for i in idx_for(n_img)]) for _ in range(reps)],
        lambda: [img.get_batch(idx_for(n_img))["image"] for _ in range(reps)],
    )
    figures.append(
        figure(
            "vs_memory",
            a_code.speedup,
            ">= 0.8",
            spread=ratio_spread(a_code),
            note="token corpus, batch 64 padded; >1 = indexed faster",
        )
    )
    figures.append(
        figure(
            "vs_memory_images",
            a_img.speedup,
            ">= 0.8",
            spread=ratio_spread(a_img),
            note="3x32x32 uint8, batch 64 stacked",
        )
    )

    # (b) single reads vs seek + read + parse
    log(f"[{BENCH}] (b) single reads vs seek+read ...")
    blob = tmp / "plain.bin"
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    blob.write_bytes(b"".join(texts))
    fh = open(blob, "rb")  # noqa: SIM115
    off_list = offsets.tolist()

    def seek_read(i: int) -> torch.Tensor:
        fh.seek(off_list[i])
        return torch.frombuffer(bytearray(fh.read(off_list[i + 1] - off_list[i])), dtype=torch.uint8)

    singles = 256
    b = cmp(
        lambda: [seek_read(int(i)) for i in gen.integers(0, len(texts), size=singles)],
        lambda: [code[int(i)] for i in gen.integers(0, len(texts), size=singles)],
    )
    figures.append(
        figure(
            "vs_seek_read",
            b.speedup,
            ">= 1.5",
            spread=ratio_spread(b),
            note="256 random single-sample reads of the token corpus",
        )
    )

    # (c) Hugging Face datasets (Arrow, memory-mapped), numpy format: its fastest per-sample path
    try:
        import datasets as hf_datasets
    except ImportError:
        hf_datasets = None
    if hf_datasets is None:
        skipped = "skipped: Hugging Face datasets is not installed"
        figures.append(figure("vs_hf_datasets", None, None, note=skipped))
    else:
        log(f"[{BENCH}] (c) single reads vs Hugging Face datasets ...")
        hf_dir = tmp / "hf"
        hf_datasets.Dataset.from_dict(
            {"tokens": [np.frombuffer(t, np.uint8) for t in texts]},
            features=hf_datasets.Features({"tokens": hf_datasets.Sequence(hf_datasets.Value("uint8"))}),
        ).save_to_disk(str(hf_dir))
        hf = hf_datasets.load_from_disk(str(hf_dir)).with_format("numpy")
        for i in (0, len(texts) - 1):
            assert np.array_equal(hf[i]["tokens"], np.frombuffer(texts[i], np.uint8))
        hf_singles = 64
        c = cmp(
            lambda: [torch.from_numpy(hf[int(i)]["tokens"]) for i in gen.integers(0, len(texts), hf_singles)],
            lambda: [code[int(i)]["tokens"] for i in gen.integers(0, len(texts), hf_singles)],
        )
        figures.append(
            figure(
                "vs_hf_datasets",
                c.speedup,
                ">= 10",
                spread=ratio_spread(c),
                note=f"{hf_singles} random single-sample reads; datasets {hf_datasets.__version__}, "
                "load_from_disk (memory-mapped Arrow), numpy format",
            )
        )

    # (d) a batch in one __getitems__ call vs one call per sample, each collated as a DataLoader does
    # (default_collate for per-sample dicts; the dataset's own collate for its gathered batch)
    log(f"[{BENCH}] (d) __getitems__ vs per-sample calls ...")
    from torch.utils.data import default_collate

    from torchkiln.data import collate_samples, pad_collate

    probe = idx_for(n_img)
    one, many = default_collate([img[int(i)] for i in probe]), collate_samples(img.__getitems__(probe))
    assert all(torch.equal(one[k], many[k]) for k in one)
    d_img = cmp(
        lambda: [default_collate([img[int(i)] for i in idx_for(n_img)]) for _ in range(reps)],
        lambda: [collate_samples(img.__getitems__(idx_for(n_img))) for _ in range(reps)],
    )
    d_code = cmp(
        lambda: [pad_collate([code[int(i)] for i in idx_for(len(texts))]) for _ in range(reps)],
        lambda: [pad_collate(code.__getitems__(idx_for(len(texts)))) for _ in range(reps)],
    )
    figures.append(
        figure(
            "batched_vs_single",
            d_img.speedup,
            ">= 2",
            spread=ratio_spread(d_img),
            note="images+labels, batch 64, collated (default_collate of 64 reads vs one gather)",
        )
    )
    figures.append(
        figure(
            "batched_vs_single_tokens",
            d_code.speedup,
            None,
            spread=ratio_spread(d_code),
            note="token corpus, padded by pad_collate: both are zero-copy views until padding",
        )
    )
    fh.close()
    return record(
        BENCH,
        figures,
        note=f"{len(texts)} stdlib files, {n_img} images, warm page cache; data in {tmp}",
        quick=bool(quick),
        batch_size=batch,
        files=len(texts),
        images=n_img,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__)


if __name__ == "__main__":
    main()
