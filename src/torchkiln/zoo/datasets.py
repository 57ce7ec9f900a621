"""Built-in datasets that need no download: ``digits`` (scikit-learn's bundled images), ``pycode``
(this machine's Python standard library as a byte-level corpus) and ``synthetic`` (for tests).

Every dataset is map-style, yields ``(x, y)`` tensor pairs and carries what a model needs to be
built: ``task`` ("classification", "lm" or "regression"), ``input_shape`` (per sample) and
``num_classes`` (classification) or ``vocab_size`` and ``seq_len`` (language modelling).

>>> from torchkiln.zoo import create_dataset
>>> ds = create_dataset("digits", split="val", layout="image")
>>> len(ds), ds.input_shape, ds.num_classes, ds[0][0].shape
(270, (1, 8, 8), 10, torch.Size([1, 8, 8]))
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from torchkiln.zoo.registry import DATASETS, SPLITS

__all__ = [
    "TensorPairDataset",
    "ByteBlockDataset",
    "digits",
    "pycode",
    "synthetic",
    "cache_dir",
    "build_pycode_cache",
]

log = logging.getLogger(__name__)


def _check_split(split: str, where: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{where}: unknown split {split!r}; accepted splits: {', '.join(SPLITS)}")


def _split_seed(seed: int, split: str) -> int:
    return int(seed) * 1000 + 1 + SPLITS.index(split)


class TensorPairDataset(Dataset):
    """In-memory ``(x[i], y[i])`` pairs; extra keyword arguments become attributes (``num_classes``...)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, **attrs: Any) -> None:
        if len(x) != len(y):
            raise ValueError(f"TensorPairDataset: x has {len(x)} samples but y has {len(y)}")
        self.x = x
        self.y = y
        for key, value in attrs.items():
            setattr(self, key, value)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __repr__(self) -> str:
        name = getattr(self, "name", type(self).__name__)
        split = getattr(self, "split", "?")
        return f"<{name} split={split} n={len(self)} x={tuple(self.x.shape[1:])} y={tuple(self.y.shape[1:])}>"


# ------------------------------------------------------------------------------------------ digits


@functools.lru_cache(maxsize=4)
def _digits_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    train_idx, rest_idx = train_test_split(idx, test_size=0.30, stratify=y, random_state=seed)
    val_idx, test_idx = train_test_split(rest_idx, test_size=0.50, stratify=y[rest_idx], random_state=seed)
    return {name: (x[i], y[i]) for name, i in (("train", train_idx), ("val", val_idx), ("test", test_idx))}


@DATASETS.register("digits")
def digits(
    split: str = "train", layout: Literal["flat", "image"] = "flat", seed: int = 0
) -> TensorPairDataset:
    """Handwritten digits bundled with scikit-learn: 1797 8x8 images, 10 classes, stratified 70/15/15.

    Pixels are scaled to [0, 1] (float32), labels are int64. ``layout="flat"`` gives samples of shape
    (64,), ``layout="image"`` (1, 8, 8). The split is deterministic for a given ``seed``.

    >>> ds = digits("train")
    >>> len(ds), ds.input_shape, ds[0][1].dtype
    (1257, (64,), torch.int64)
    """
    _check_split(split, "dataset 'digits'")
    if layout not in ("flat", "image"):
        raise ValueError(f"dataset 'digits': unknown layout {layout!r}; accepted: 'flat', 'image'")
    x, y = _digits_splits(int(seed))[split]
    shape = (64,) if layout == "flat" else (1, 8, 8)
    xt = torch.from_numpy(x.copy()).reshape(len(x), *shape)
    return TensorPairDataset(
        xt,
        torch.from_numpy(y.copy()),
        name="digits",
        split=split,
        task="classification",
        num_classes=10,
        input_shape=shape,
    )


# ------------------------------------------------------------------------------------------ pycode

_PYCODE_FORMAT = 1  # bump when the cache layout or content rules change
_SEPARATOR = b"\x00"  # between files; never appears in ordinary source text


def cache_dir() -> Path:
    """``$TORCHKILN_CACHE`` or ``~/.cache/torchkiln`` (created if missing)."""
    path = Path(os.environ.get("TORCHKILN_CACHE") or Path.home() / ".cache" / "torchkiln").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _list_sources(root: Path) -> list[tuple[str, int]]:
    """Sorted ``(relative posix path, size)`` of ``*.py`` files under ``root``, without site-packages."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for fname in filenames:
            if not fname.endswith(".py"):
                continue
            full = os.path.join(dirpath, fname)
            try:
                size = os.stat(full).st_size
            except OSError:
                continue
            out.append((Path(full).relative_to(root).as_posix(), size))
    out.sort()
    return out


def _file_split(relpath: str) -> str:
    bucket = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 90 else ("val" if bucket < 95 else "test")


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy next to ``path``, fsync it, then rename: a crash never leaves a
    complete-looking file with partial content."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is plain shared data
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        try:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # pragma: no cover
            return
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def build_pycode_cache(root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Build (or find) the cached byte corpus of every ``*.py`` file under ``root`` (default: the
    standard library) and return the ``.npy`` path of each split.

    The cache key covers the Python version, the root path and a hash of the file list (paths and
    sizes), so a changed library gets a fresh cache.
    """
    src = Path(root if root is not None else sysconfig.get_paths()["stdlib"]).expanduser().resolve()
    if not src.is_dir():
        raise ValueError(f"dataset 'pycode': root {str(src)!r} is not a directory of Python files")
    files = _list_sources(src)
    if not files:
        raise ValueError(f"dataset 'pycode': no *.py files under {str(src)!r}")
    listing = "\n".join(f"{rel}\t{size}" for rel, size in files)
    key = hashlib.sha1(f"{_PYCODE_FORMAT}\n{src}\n{listing}".encode()).hexdigest()[:16]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    paths = {split: cache_dir() / f"pycode-{tag}-{key}-{split}.npy" for split in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths

    start = time.perf_counter()
    chunks: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    used = 0
    for rel, _ in files:
        try:
            data = (src / rel).read_bytes()
        except OSError:  # unreadable: skipped (the key still covers the listing)
            continue
        split = _file_split(rel)
        if chunks[split]:
            chunks[split].append(_SEPARATOR)
        chunks[split].append(data)
        used += 1
    for split, parts in chunks.items():
        array = np.frombuffer(b"".join(parts), dtype=np.uint8)
        _atomic_save(paths[split], array)
    log.info(
        "built pycode cache from %d files under %s in %.2fs: %s",
        used,
        src,
        time.perf_counter() - start,
        ", ".join(f"{s}={os.path.getsize(p) / 1e6:.1f} MB" for s, p in paths.items()),
    )
    return paths


class ByteBlockDataset(Dataset):
    """Non-overlapping next-byte blocks of a uint8 ``.npy`` file opened as a read-only memmap.

    Item ``i`` is ``x = data[i*L : i*L+L]``, ``y = data[i*L+1 : i*L+L+1]`` (int64, ``L = seq_len``).
    Pickling keeps only the path, so DataLoader workers reopen the memmap instead of copying it.
    """

    def __init__(
        self, path: str | os.PathLike[str], seq_len: int, max_bytes: int | None = None, **attrs: Any
    ):
        self.path = str(path)
        self.seq_len = int(seq_len)
        self._data: np.ndarray | None = None
        total = len(self._open())
        self.num_bytes = total if max_bytes is None else min(total, int(max_bytes))
        for key, value in attrs.items():
            setattr(self, key, value)

    def _open(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.path, mmap_mode="r")
        return self._data

    def __len__(self) -> int:
        return max(0, (self.num_bytes - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range for {n} blocks")
        start = index * self.seq_len
        chunk = np.array(self._open()[start : start + self.seq_len + 1], dtype=np.int64)
        t = torch.from_numpy(chunk)
        return t[:-1], t[1:]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def __repr__(self) -> str:
        return f"<pycode split={getattr(self, 'split', '?')} bytes={self.num_bytes} blocks={len(self)}>"


@DATASETS.register("pycode")
def pycode(
    split: str = "train",
    seq_len: int = 128,
    max_bytes: int | None = None,
    root: str | None = None,
) -> ByteBlockDataset:
    """Byte-level language modelling on this machine's Python standard library source (~30 MB).

    Files are split 90/5/5 by a hash of their relative path; the corpus is cached under
    ``$TORCHKILN_CACHE`` (or ``~/.cache/torchkiln``) and memory-mapped. ``max_bytes`` keeps a
    prefix of the split (quick runs); ``root`` uses another directory of ``*.py`` files.

    >>> ds = pycode("val", seq_len=64, max_bytes=10_000)
    >>> len(ds), ds.vocab_size, ds[0][0].shape
    (156, 256, torch.Size([64]))
    """
    _check_split(split, "dataset 'pycode'")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"dataset 'pycode': seq_len must be a positive integer, got {seq_len!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < seq_len + 1):
        raise ValueError(
            f"dataset 'pycode': max_bytes must be None or an integer >= seq_len + 1 = {seq_len + 1}, "
            f"got {max_bytes!r}"
        )
    paths = build_pycode_cache(root)
    return ByteBlockDataset(
        paths[split],
        seq_len,
        max_bytes,
        name="pycode",
        split=split,
        task="lm",
        vocab_size=256,
        input_shape=(seq_len,),
    )


# --------------------------------------------------------------------------------------- synthetic


@DATASETS.register("synthetic")
def synthetic(
    split: str = "train",
    task: Literal["classification", "image", "lm", "regression"] = "classification",
    n: int = 512,
    features: int = 32,
    num_classes: int = 10,
    image_shape: tuple[int, ...] = (3, 16, 16),
    seq_len: int = 32,
    vocab_size: int = 64,
    seed: int = 0,
) -> TensorPairDataset:
    """Deterministic learnable data for tests: classification, image, lm or regression.

    The task (teacher network, class templates, token rule) depends on ``seed`` only; the samples
    of each split come from a different generator, so splits differ but share the task.

    >>> ds = synthetic(task="lm", n=8, seq_len=16, vocab_size=32)
    >>> ds[0][0].shape, ds.vocab_size, ds.task
    (torch.Size([16]), 32, 'lm')
    """
    _check_split(split, "dataset 'synthetic'")
    if task not in ("classification", "image", "lm", "regression"):
        raise ValueError(
            f"dataset 'synthetic': unknown task {task!r}; accepted: 'classification', 'image', 'lm', "
            "'regression'"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"dataset 'synthetic': n must be a positive integer, got {n!r}")
    task_gen = torch.Generator().manual_seed(int(seed))  # defines the task, shared by all splits
    gen = torch.Generator().manual_seed(_split_seed(seed, split))  # the samples of this split
    common = {"name": "synthetic", "split": split}

    if task == "classification":
        w1 = torch.randn(features, 64, generator=task_gen) / features**0.5
        w2 = torch.randn(64, num_classes, generator=task_gen) / 8.0
        x = torch.randn(n, features, generator=gen)
        y = (torch.tanh(x @ w1) @ w2).argmax(1)
        return TensorPairDataset(
            x, y, task="classification", num_classes=num_classes, input_shape=(features,), **common
        )

    if task == "image":
        shape = tuple(image_shape)
        if len(shape) != 3:
            raise ValueError(
                f"dataset 'synthetic': image_shape must be (channels, height, width), got {shape}"
            )
        c, h, w = shape
        # Smooth class templates (coarse noise upsampled), so convolutions can pick them up.
        coarse = torch.randn(num_classes, c, max(1, h // 4), max(1, w // 4), generator=task_gen)
        templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        y = torch.randint(0, num_classes, (n,), generator=gen)
        x = templates[y] + 0.5 * torch.randn(n, c, h, w, generator=gen)
        return TensorPairDataset(
            x, y, task="classification", num_classes=num_classes, input_shape=shape, **common
        )

    if task == "regression":
        w = torch.randn(features, 1, generator=task_gen) / features**0.5
        x = torch.randn(n, features, generator=gen)
        y = x @ w + 0.05 * torch.randn(n, 1, generator=gen)
        return TensorPairDataset(x, y, task="regression", num_outputs=1, input_shape=(features,), **common)

    # lm: next = (a * token + b) mod V, with 10% of tokens replaced by random ones.
    a = int(torch.randint(1, vocab_size, (1,), generator=task_gen)) | 1
    b = int(torch.randint(0, vocab_size, (1,), generator=task_gen))
    seq = torch.empty(n, seq_len + 1, dtype=torch.int64)
    seq[:, 0] = torch.randint(0, vocab_size, (n,), generator=gen)
    noise = torch.rand(n, seq_len, generator=gen) < 0.1
    random_tokens = torch.randint(0, vocab_size, (n, seq_len), generator=gen)
    for t in range(seq_len):
        nxt = (seq[:, t] * a + b) % vocab_size
        seq[:, t + 1] = torch.where(noise[:, t], random_tokens[:, t], nxt)
    return TensorPairDataset(
        seq[:, :-1].contiguous(),
        seq[:, 1:].contiguous(),
        task="lm",
        vocab_size=vocab_size,
        seq_len=seq_len,
        input_shape=(seq_len,),
        **common,
    )
