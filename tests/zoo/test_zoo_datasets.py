"""Built-in datasets: digits, pycode (cache building, memmap, splits) and synthetic."""

from __future__ import annotations

import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from torchkiln.errors import RecipeError
from torchkiln.zoo import create_dataset, list_datasets
from torchkiln.zoo import datasets as zds

# ------------------------------------------------------------------------------------------ digits


@pytest.mark.parametrize("layout,shape", [("flat", (64,)), ("image", (1, 8, 8))])
def test_digits_sizes_and_values(layout: str, shape: tuple[int, ...]) -> None:
    splits = {s: create_dataset("digits", split=s, layout=layout) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] == pytest.approx(0.70 * 1797, abs=2)
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=2)
    for ds in splits.values():
        assert ds.num_classes == 10 and ds.input_shape == shape and ds.task == "classification"
        x, y = ds[0]
        assert x.shape == shape and x.dtype == torch.float32 and y.dtype == torch.int64
        assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0 and ds.x.max() == 1.0
        assert set(ds.y.tolist()) == set(range(10))  # stratified: every class in every split


def test_digits_disjoint_and_deterministic() -> None:
    from sklearn.datasets import load_digits

    # the three splits partition the 1797 samples: together they hold every sample exactly once
    everything = Counter(tuple((r / 16.0).astype(np.float32).tolist()) for r in load_digits().data)
    pooled: Counter[tuple[float, ...]] = Counter()
    for split in ("train", "val", "test"):
        pooled.update(tuple(r.tolist()) for r in create_dataset("digits", split=split).x)
    assert pooled == everything
    a = create_dataset("digits", split="train")
    b = create_dataset("digits", split="train")
    torch.testing.assert_close(a.x, b.x)
    torch.testing.assert_close(a.y, b.y)
    assert not torch.equal(a.x, create_dataset("digits", split="train", seed=1).x)


def test_digits_bad_layout_and_split() -> None:
    with pytest.raises(RecipeError, match="layout='square'.*'flat', 'image'"):
        create_dataset("digits", layout="square")
    with pytest.raises(RecipeError, match="unknown split 'dev'.*train, val, test"):
        create_dataset("digits", split="dev")


# ------------------------------------------------------------------------------------------ pycode


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    """A small fake library: enough files that all three splits get some."""
    root = tmp_path / "lib"
    for i in range(80):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"# module {i}\n" + "def f(x):\n    return x + 1\n" * (i + 1))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_text("SKIPPED = True\n" * 100)
    (root / "notes.txt").write_text("not python")
    return root


def test_pycode_builds_caches_and_shifts(
    cache: Path, source_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = create_dataset("pycode", split="train", seq_len=16, root=str(source_tree))
    assert ds.vocab_size == 256 and ds.seq_len == 16 and ds.task == "lm" and ds.input_shape == (16,)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and all(f.startswith("pycode-py") and f.endswith(".npy") for f in files)
    assert {f.rsplit("-", 1)[1] for f in files} == {"train.npy", "val.npy", "test.npy"}
    assert not [p for p in cache.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]

    data = np.load(ds.path, mmap_mode="r")
    assert data.dtype == np.uint8 and isinstance(data, np.memmap)
    text = bytes(data)
    assert b"SKIPPED" not in text and b"not python" not in text
    assert text.count(b"\x00") == text.count(b"# module") - 1  # one separator between files

    assert len(ds) == (len(data) - 1) // 16
    for i in (0, 1, len(ds) - 1):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16,)
        assert torch.equal(x[1:], y[:-1])
        assert bytes(x.tolist()) == text[i * 16 : i * 16 + 16]
        assert bytes(y.tolist()) == text[i * 16 + 1 : i * 16 + 17]
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]

    # the second load hits the cache: nothing is written again
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache rebuilt")

    monkeypatch.setattr(zds, "_atomic_save", fail)
    again = create_dataset("pycode", split="val", seq_len=16, root=str(source_tree))
    assert len(again) > 0


def test_pycode_split_by_file_and_cache_key(cache: Path, source_tree: Path) -> None:
    parts = {
        s: bytes(np.load(create_dataset("pycode", split=s, seq_len=8, root=str(source_tree)).path))
        for s in ("train", "val", "test")
    }
    assert all(parts.values())
    sizes = {s: len(b) for s, b in parts.items()}
    assert sizes["train"] > sizes["val"] and sizes["train"] > sizes["test"]
    modules = {s: set(re.findall(rb"# module \d+", b)) for s, b in parts.items()}
    assert not (modules["train"] & modules["val"]) and not (modules["train"] & modules["test"])
    assert len(modules["train"] | modules["val"] | modules["test"]) == 80
    # a changed file list gives a new cache key
    (source_tree / "pkg0" / "new.py").write_text("NEW = 1\n")
    create_dataset("pycode", seq_len=8, root=str(source_tree))
    assert len(list(cache.glob("pycode-*.npy"))) == 6


def test_pycode_max_bytes_and_pickle(cache: Path, source_tree: Path) -> None:
    ds = create_dataset("pycode", seq_len=10, max_bytes=101, root=str(source_tree))
    assert len(ds) == 10 and ds.num_bytes == 101
    full = create_dataset("pycode", seq_len=10, root=str(source_tree))
    assert torch.equal(ds[3][1], full[3][1])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._data is None  # reopened lazily, not copied
    assert torch.equal(clone[9][0], ds[9][0])
    with pytest.raises(ValueError, match="max_bytes must be None or an integer >= seq_len \\+ 1 = 11"):
        create_dataset("pycode", seq_len=10, max_bytes=5, root=str(source_tree))


def test_pycode_atomic_write_leaves_nothing_on_failure(
    cache: Path, source_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(f: object, array: np.ndarray, allow_pickle: bool = False) -> None:
        f.write(b"\x93NUMPY partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(zds.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        create_dataset("pycode", root=str(source_tree))
    assert list(cache.iterdir()) == []


def test_pycode_real_stdlib(cache: Path) -> None:
    ds = create_dataset("pycode", split="val", seq_len=64, max_bytes=64 * 50 + 1)
    assert len(ds) == 50
    x, y = ds[0]
    assert torch.equal(x[1:], y[:-1])
    assert 0 < int(x.max()) < 256
    text = bytes(np.load(create_dataset("pycode", split="train").path, mmap_mode="r")[:100_000])
    assert b"def " in text and b"import " in text


# --------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("task", ["classification", "image", "lm", "regression"])
def test_synthetic_tasks(task: str) -> None:
    train = create_dataset("synthetic", split="train", task=task, n=64)
    again = create_dataset("synthetic", split="train", task=task, n=64)
    val = create_dataset("synthetic", split="val", task=task, n=64)
    assert len(train) == 64
    torch.testing.assert_close(train.x, again.x)
    torch.testing.assert_close(train.y, again.y)
    assert not torch.equal(train.x, val.x)
    x, y = train[0]
    assert tuple(x.shape) == train.input_shape
    if task in ("classification", "image"):
        assert train.num_classes == 10 and y.dtype == torch.int64
        assert len(set(train.y.tolist())) >= 3  # labels are not degenerate
    elif task == "lm":
        assert train.vocab_size == 64 and train.seq_len == 32 and x.dtype == torch.int64
        assert torch.equal(train.x[:, 1:], train.y[:, :-1])
    else:
        assert y.shape == (1,) and y.dtype == torch.float32


def test_synthetic_lm_is_learnable() -> None:
    ds = create_dataset("synthetic", task="lm", n=256)
    # the rule next = (a * t + b) mod V holds for ~90% of positions; recover it from the data
    pairs = torch.stack([ds.x.flatten(), ds.y.flatten()], 1)
    counts = torch.zeros(64, 64)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(pairs)), accumulate=True)
    best = counts.max(1).values.sum() / counts.sum()
    assert best > 0.85


def test_synthetic_classification_is_learnable() -> None:
    train = create_dataset("synthetic", task="classification", n=512)
    val = create_dataset("synthetic", split="val", task="classification", n=256)
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=500).fit(train.x.numpy(), train.y.numpy())
    assert clf.score(val.x.numpy(), val.y.numpy()) > 0.5


def test_list_datasets() -> None:
    assert list_datasets() == ["digits", "pycode", "synthetic"]
    assert list_datasets("py*") == ["pycode"]
