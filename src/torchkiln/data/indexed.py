"""A memory-mapped indexed dataset with several named fields per sample (in the spirit of Megatron's
``MMapIndexedDataset``), for corpora larger than memory.

A dataset is two files next to each other, named by a *stem* ``P``: ``P.bin`` (the data) and ``P.idx``
(the index). Every path argument accepts the stem, ``P.idx`` or ``P.bin``.

Fields are either *fixed-shape* (``shape`` without ``None``: images, scalar labels with ``shape=()``)
or *variable-length* along their first dimension (``shape=(None,)`` for token sequences, or
``(None, 3)``). Each field's data is one contiguous region of ``P.bin``: a fixed field is an array
``(n, *shape)``, a variable field a flat array cut by ``offsets`` (``n + 1`` int64 in the index).

File layout (little endian, format version :data:`FORMAT_VERSION`)::

    P.bin  0  magic b"KILNBIN\\0" | 8 version u32 | 12 reserved u32 | 16 token (16 random bytes)
           64 field regions, each aligned to 64 bytes
    P.idx  0  magic b"KILNIDX\\0" | 8 version u32 | 12 meta length u32 | 16 crc32 of bytes [24:] u32
           20 reserved u32 | 24 JSON metadata | index arrays (offsets, chunk crc32s), 8-aligned

The writer streams each field to its own temporary part file; ``close()`` concatenates the parts into a
temporary ``.bin`` (computing a crc32 per ``chunk_size`` bytes), fsyncs and renames it, then writes the
index the same way and renames it *last*. A crash at any point leaves no ``P.idx`` that matches a
``P.bin`` (an existing ``P.idx`` is removed first; the random token ties an index to its data file),
so the reader refuses it. Temporary files (``.P.*.tmp``) of a killed writer may remain.

The reader maps ``P.bin`` copy-on-write (``mmap.ACCESS_COPY`` on a file opened read-only) and returns
tensors that are zero-copy views of the mapping. The file is never modified; treat the tensors as
read-only: an in-place op on one changes this process's private copy of that page (and what later
reads of the same sample in this process return), never the file -- ``.clone()`` before modifying.
Reads use no file position (no seek/read), so threads and DataLoader workers can share a dataset;
pickling drops the mapping and each process maps the file again on first use.

>>> import tempfile, os, numpy as np
>>> d = tempfile.mkdtemp()
>>> samples = [{"tokens": np.arange(n, dtype=np.int32), "label": n % 2} for n in (3, 5, 2)]
>>> ds = write_indexed_dataset(os.path.join(d, "toy"), samples)
>>> len(ds), ds.fields["tokens"], ds.fields["label"]
(3, Field(dtype='int32', shape=(None,)), Field(dtype='int64', shape=()))
>>> ds[1]["tokens"], int(ds[1]["label"])
(tensor([0, 1, 2, 3, 4], dtype=torch.int32), 1)
>>> ds.lengths("tokens")
array([3, 5, 2])
"""

from __future__ import annotations

import array
import json
import mmap
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from torchkiln.errors import KilnError

__all__ = [
    "DatasetFormatError",
    "Field",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "SampleBatch",
    "collate_samples",
    "write_indexed_dataset",
    "verify_indexed_dataset",
    "dataset_paths",
    "is_indexed_dataset",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
BIN_MAGIC = b"KILNBIN\x00"
IDX_MAGIC = b"KILNIDX\x00"
BIN_HEADER = 64
IDX_FIXED = 24
ALIGN = 64
DEFAULT_CHUNK = 4 << 20  # crc32 per 4 MiB of P.bin


class DatasetFormatError(KilnError, ValueError):
    """An indexed dataset is missing, truncated, corrupt or of another format version."""


def dataset_paths(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(stem, stem.idx, stem.bin)`` for a stem, ``stem.idx`` or ``stem.bin``."""
    p = Path(path)
    if p.suffix in (".idx", ".bin"):
        p = p.with_suffix("")
    return p, Path(str(p) + ".idx"), Path(str(p) + ".bin")


def is_indexed_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a dataset whose index file exists (no validation)."""
    return dataset_paths(path)[1].is_file()


# ------------------------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Field:
    """One named field: numpy ``dtype`` and per-sample ``shape`` (``None`` first = variable length)."""

    dtype: str
    shape: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        dt = np.dtype(self.dtype)
        if dt.hasobject or dt.kind not in "biufc":
            raise ValueError(f"field dtype must be a numeric numpy dtype, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dt.name if dt.name != "bool" else "bool")
        shape = tuple(None if s is None else int(s) for s in self.shape)
        if any(s is None for s in shape[1:]) or any(s is not None and s < 0 for s in shape):
            raise ValueError(f"field shape: only the first dimension may be None, got {self.shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def variable(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    @property
    def inner(self) -> tuple[int, ...]:
        """Shape of one row (variable) or of the whole sample (fixed)."""
        return tuple(self.shape[1:]) if self.variable else tuple(self.shape)  # type: ignore[arg-type]

    @property
    def row_elems(self) -> int:
        return int(np.prod(self.inner, dtype=np.int64))

    @classmethod
    def coerce(cls, spec: Any) -> Field:
        if isinstance(spec, Field):
            return spec
        if isinstance(spec, Mapping):
            return cls(spec["dtype"], tuple(spec.get("shape", ())))
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], (tuple, list)):
            return cls(str(np.dtype(spec[0])), tuple(spec[1]))
        return cls(str(np.dtype(spec)), ())

    @classmethod
    def infer(cls, value: Any) -> Field:
        """Scalars are fixed ``()``, 1-D arrays variable-length, arrays of 2+ dims fixed-shape."""
        arr = _as_array(value)
        if arr.ndim == 0:
            dt = (
                arr.dtype
                if not isinstance(value, (bool, int, float))
                else np.dtype({bool: "bool", int: "int64", float: "float32"}[type(value)])
            )
            return cls(str(dt), ())
        if arr.ndim == 1:
            return cls(str(arr.dtype), (None,))
        return cls(str(arr.dtype), tuple(arr.shape))


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(value, dtype=np.uint8)
    return np.asarray(value)


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- writer


class SampleBatch(Sequence):
    """Samples gathered in one call: per-field columns that also read as a list of per-sample dicts.

    ``columns[name]`` is a ``(B, *shape)`` tensor for a fixed-shape field or a list of ``B`` tensors
    for a variable-length one. ``batch[k]`` builds sample ``k``'s dict of views on demand, so code that
    expects a list of samples (``default_collate``, :func:`~torchkiln.data.pad_collate`) works unchanged.
    """

    __slots__ = ("columns", "_n")

    def __init__(self, columns: dict[str, Any], n: int) -> None:
        self.columns = columns
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: Any) -> Any:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(self._n))]
        return {name: col[k] for name, col in self.columns.items()}

    def __repr__(self) -> str:
        return f"SampleBatch(n={self._n}, fields={list(self.columns)})"


def collate_samples(samples: Sequence[Any]) -> Any:
    """Collate for indexed datasets: a :class:`SampleBatch` of fixed-shape fields is already a batch
    (its columns are returned as they are: no per-sample stacking); anything else goes to
    ``torch.utils.data.default_collate``. Variable-length fields need padding: use
    :func:`~torchkiln.data.pad_collate` for those.
    """
    if isinstance(samples, SampleBatch):
        if all(isinstance(c, torch.Tensor) for c in samples.columns.values()):
            return dict(samples.columns)
        samples = list(samples)
    return torch.utils.data.default_collate(samples)


class IndexedDatasetWriter:
    """Stream samples (mappings of field name to array/tensor/scalar/bytes) into ``P.bin`` + ``P.idx``.

    ``fields`` maps names to :class:`Field`, ``(dtype, shape)`` or a dtype (scalar); when None the
    fields are inferred from the first sample (:meth:`Field.infer`). ``checksums`` stores a crc32
    per ``chunk_size`` bytes of ``P.bin`` for :func:`verify_indexed_dataset`. Use as a context
    manager: leaving the block normally finalizes atomically, an exception discards everything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fields: Mapping[str, Any] | None = None,
        *,
        checksums: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.stem, self.idx_path, self.bin_path = dataset_paths(path)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.fields: dict[str, Field] | None = None
        self.checksums = bool(checksums)
        self.chunk_size = int(chunk_size)
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.attrs = dict(attrs or {})
        json.dumps(self.attrs)  # must be JSON-serialisable
        self.count = 0
        self._parts: dict[str, Any] = {}
        self._part_paths: dict[str, str] = {}
        self._elems: dict[str, int] = {}
        self._lengths: dict[str, array.array] = {}
        self._closed = False
        if fields is not None:
            self._setup({name: Field.coerce(spec) for name, spec in fields.items()})

    def _tmp(self, what: str) -> str:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.stem.name}.{what}.", suffix=".tmp", dir=self.stem.parent)
        os.close(fd)
        return tmp

    def _setup(self, fields: dict[str, Field]) -> None:
        if not fields:
            raise ValueError("an indexed dataset needs at least one field")
        for name in fields:
            if not isinstance(name, str) or not name:
                raise ValueError(f"field names must be non-empty strings, got {name!r}")
        self.fields = fields
        for name, field in fields.items():
            tmp = self._tmp(f"part-{len(self._part_paths)}")
            self._part_paths[name] = tmp
            self._parts[name] = open(tmp, "wb", buffering=1 << 20)  # noqa: SIM115
            self._elems[name] = 0
            if field.variable:
                self._lengths[name] = array.array("q")

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, sample: Mapping[str, Any]) -> None:
        """Append one sample; every field must be present with a fitting dtype and shape."""
        if self._closed:
            raise ValueError(f"writer for {self.stem} is closed")
        if self.fields is None:
            self._setup({name: Field.infer(value) for name, value in sample.items()})
        fields = self.fields
        assert fields is not None
        if len(sample) != len(fields) or any(k not in sample for k in fields):
            raise ValueError(
                f"sample {self.count}: fields {sorted(sample)} do not match the dataset's {sorted(fields)}"
            )
        for name, field in fields.items():
            arr = _as_array(sample[name])
            dt = np.dtype(field.dtype)
            if arr.dtype != dt:
                if not np.can_cast(arr.dtype, dt, casting="same_kind"):
                    raise ValueError(
                        f"sample {self.count}, field {name!r}: dtype {arr.dtype} cannot be stored as "
                        f"{dt} (same-kind casting)"
                    )
                arr = arr.astype(dt)
            if field.variable:
                if arr.ndim != len(field.shape) or tuple(arr.shape[1:]) != field.inner:
                    raise ValueError(
                        f"sample {self.count}, field {name!r}: shape {tuple(arr.shape)} does not fit "
                        f"{field.shape} (None = any length)"
                    )
                self._lengths[name].append(arr.shape[0])
            elif tuple(arr.shape) != field.shape:
                raise ValueError(
                    f"sample {self.count}, field {name!r}: shape {tuple(arr.shape)}, expected {field.shape}"
                )
            self._parts[name].write(np.ascontiguousarray(arr).tobytes())
            self._elems[name] += arr.size
        self.count += 1

    def extend(self, samples: Iterable[Mapping[str, Any]]) -> None:
        for sample in samples:
            self.add(sample)

    def abort(self) -> None:
        """Discard everything written so far (no dataset files are created)."""
        self._closed = True
        for fh in self._parts.values():
            fh.close()
        for tmp in self._part_paths.values():
            _unlink(tmp)

    def close(self) -> None:
        """Finalize: build ``P.bin`` then ``P.idx`` (renamed last), each via temp file + fsync + rename."""
        if self._closed:
            return
        if self.fields is None:
            raise ValueError(f"{self.stem}: no samples and no fields given; nothing to write")
        fields = self.fields
        bin_tmp = idx_tmp = None
        try:
            for fh in self._parts.values():
                fh.close()
            token = uuid.uuid4().bytes
            regions: dict[str, dict[str, Any]] = {}
            bin_tmp = self._tmp("bin")
            with open(bin_tmp, "wb") as out:
                crc = _ChunkCrc(out, self.chunk_size)
                crc.write(BIN_MAGIC + struct.pack("<II", FORMAT_VERSION, 0) + token)
                crc.write(b"\0" * (BIN_HEADER - crc.pos))
                for name in fields:
                    start = crc.pos
                    with open(self._part_paths[name], "rb") as part:
                        while block := part.read(1 << 22):
                            crc.write(block)
                    nbytes = crc.pos - start
                    regions[name] = {"offset": start, "nbytes": nbytes, "elems": self._elems[name]}
                    crc.write(b"\0" * (_align(crc.pos) - crc.pos))
                crc.finish()
                out.flush()
                os.fsync(out.fileno())
                bin_size = crc.pos
            arrays: list[tuple[str, np.ndarray]] = []
            for name, field in fields.items():
                if field.variable:
                    lengths = (
                        np.frombuffer(self._lengths[name], dtype=np.int64)
                        if self.count
                        else (np.zeros(0, np.int64))
                    )
                    offsets = np.zeros(self.count + 1, dtype=np.int64)
                    np.cumsum(lengths, out=offsets[1:])
                    arrays.append((f"{name}.offsets", offsets))
            if self.checksums:
                arrays.append(("chunk_crc32", np.asarray(crc.crcs, dtype=np.uint32)))
            meta = {
                "format": "torchkiln-indexed",
                "version": FORMAT_VERSION,
                "count": self.count,
                "fields": {
                    name: {"dtype": f.dtype, "shape": list(f.shape), **regions[name]}
                    for name, f in fields.items()
                },
                "bin_size": bin_size,
                "token": token.hex(),
                "chunk_size": self.chunk_size if self.checksums else None,
                "attrs": self.attrs,
            }
            idx_bytes = _build_index(meta, arrays)
            idx_tmp = self._tmp("idx")
            with open(idx_tmp, "wb") as out:
                out.write(idx_bytes)
                out.flush()
                os.fsync(out.fileno())
            for tmp in (bin_tmp, idx_tmp):
                os.chmod(tmp, 0o644)
            # Never leave an old index next to a new data file (the token check would refuse it
            # anyway); the index appears last, when everything it points to is durable.
            _unlink(self.idx_path)
            _fsync_dir(self.stem.parent)
            os.replace(bin_tmp, self.bin_path)
            bin_tmp = None
            _fsync_dir(self.stem.parent)
            os.replace(idx_tmp, self.idx_path)
            idx_tmp = None
            _fsync_dir(self.stem.parent)
        finally:
            self._closed = True
            for tmp in [*self._part_paths.values(), bin_tmp, idx_tmp]:
                if tmp is not None:
                    _unlink(tmp)


def _unlink(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _ChunkCrc:
    """Writes through to ``fh`` while keeping a crc32 per ``chunk`` bytes of the whole stream."""

    def __init__(self, fh: Any, chunk: int) -> None:
        self.fh, self.chunk, self.pos, self.crcs, self._cur = fh, chunk, 0, [], 0

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        view = memoryview(data)
        while len(view):
            room = self.chunk - (self.pos % self.chunk)
            piece = view[:room]
            self._cur = zlib.crc32(piece, self._cur)
            self.pos += len(piece)
            view = view[len(piece) :]
            if self.pos % self.chunk == 0:
                self.crcs.append(self._cur)
                self._cur = 0

    def finish(self) -> None:
        if self.pos % self.chunk:
            self.crcs.append(self._cur)


def _build_index(meta: dict[str, Any], arrays: list[tuple[str, np.ndarray]]) -> bytes:
    # The array offsets depend on the JSON length, which depends on the offsets: iterate to a fixpoint.
    layout: dict[str, list[Any]] = {}
    for _ in range(8):
        meta["arrays"] = layout
        text = json.dumps(meta).encode()  # insertion order = field order
        pos = _align(IDX_FIXED + len(text), 8)
        new = {}
        for name, arr in arrays:
            new[name] = [pos, int(arr.size), arr.dtype.str]
            pos = _align(pos + arr.nbytes, 8)
        if new == layout:
            break
        layout = new
    body = bytearray(text)
    body += b"\0" * (_align(IDX_FIXED + len(text), 8) - IDX_FIXED - len(text))
    for name, arr in arrays:
        assert IDX_FIXED + len(body) == layout[name][0]
        body += arr.tobytes()
        body += b"\0" * (_align(len(body), 8) - len(body))
    head = IDX_MAGIC + struct.pack("<IIII", FORMAT_VERSION, len(text), zlib.crc32(body), 0)
    return head + bytes(body)


def write_indexed_dataset(
    path: str | os.PathLike[str],
    samples: Iterable[Mapping[str, Any]],
    fields: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> IndexedDataset:
    """Write ``samples`` with :class:`IndexedDatasetWriter` and return the opened dataset."""
    with IndexedDatasetWriter(path, fields, **kwargs) as writer:
        writer.extend(samples)
    return IndexedDataset(path)


# ------------------------------------------------------------------------------------------- reader


def _read_index(idx_path: Path, *, check_crc: bool = True) -> tuple[dict[str, Any], bytes]:
    def bad(offset: int, what: str) -> DatasetFormatError:
        return DatasetFormatError(f"{idx_path}: at byte {offset}: {what}")

    if not idx_path.is_file():
        raise DatasetFormatError(
            f"{idx_path}: index file not found (a dataset is STEM.idx + STEM.bin; an unfinished "
            "write leaves no index)"
        )
    raw = idx_path.read_bytes()
    if len(raw) < IDX_FIXED:
        raise bad(len(raw), f"file is truncated: {len(raw)} bytes, expected a {IDX_FIXED}-byte header")
    if raw[:8] != IDX_MAGIC:
        raise bad(0, f"expected magic {IDX_MAGIC!r}, found {raw[:8]!r} (not a torchkiln index)")
    version, meta_len, crc, reserved = struct.unpack("<IIII", raw[8:IDX_FIXED])
    if version != FORMAT_VERSION:
        raise bad(8, f"format version {version}, this torchkiln reads version {FORMAT_VERSION}")
    if reserved != 0:  # the header is outside the crc: a damaged reserved field is still damage
        raise bad(20, f"reserved field is {reserved:#x}, expected 0 (the index header is corrupt)")
    if IDX_FIXED + meta_len > len(raw):
        raise bad(len(raw), f"file is truncated: metadata needs {IDX_FIXED + meta_len} bytes")
    if check_crc and zlib.crc32(raw[IDX_FIXED:]) != crc:
        raise bad(
            IDX_FIXED,
            f"crc32 of bytes {IDX_FIXED}..{len(raw)} does not match the header "
            "(the index is corrupt or truncated)",
        )
    try:
        meta = json.loads(raw[IDX_FIXED : IDX_FIXED + meta_len])
        count = int(meta["count"])
        meta["fields"], meta["arrays"], int(meta["bin_size"]), bytes.fromhex(meta["token"])
    except Exception as exc:  # noqa: BLE001 - any parse problem is a format error
        raise bad(
            IDX_FIXED, f"metadata is not valid JSON with count/fields/arrays/bin_size/token: {exc}"
        ) from None
    if count < 0:
        raise bad(IDX_FIXED, f"negative sample count {count}")
    for name, (offset, size, dtype) in meta["arrays"].items():
        end = offset + size * np.dtype(dtype).itemsize
        if offset < IDX_FIXED + meta_len or end > len(raw):
            raise bad(
                min(offset, len(raw)), f"array {name!r} needs bytes {offset}..{end}, file has {len(raw)}"
            )
    return meta, raw


def _index_array(meta: dict[str, Any], raw: bytes, name: str) -> np.ndarray:
    offset, size, dtype = meta["arrays"][name]
    return np.frombuffer(raw, dtype=np.dtype(dtype), count=size, offset=offset)


class IndexedDataset(Dataset):
    """Read a dataset written by :class:`IndexedDatasetWriter`: ``ds[i]`` is a dict of tensors.

    ``fields`` keeps a subset of the fields (in that order). Opening validates the header, version,
    index crc32, sizes and offsets and raises :class:`DatasetFormatError` naming file, offset and what
    was expected. Items are always dicts (also for two fields named ``x`` and ``y``); fixed-shape
    fields come back with their shape, scalars as 0-d tensors, variable fields as ``(length, ...)``.
    """

    def __init__(self, path: str | os.PathLike[str], fields: Sequence[str] | None = None) -> None:
        self.stem, self.idx_path, self.bin_path = dataset_paths(path)
        meta, raw = _read_index(self.idx_path)
        self.meta = meta
        self.count = int(meta["count"])
        self.token = bytes.fromhex(meta["token"])
        self.attrs = dict(meta.get("attrs") or {})
        all_fields = {
            name: Field(spec["dtype"], tuple(spec["shape"])) for name, spec in meta["fields"].items()
        }
        self.all_fields = all_fields
        if fields is None:
            fields = list(all_fields)
        unknown = [f for f in fields if f not in all_fields]
        if unknown:
            raise KeyError(f"{self.stem}: no field(s) {unknown}; the dataset has {list(all_fields)}")
        self.fields = {name: all_fields[name] for name in fields}
        self._offsets: dict[str, np.ndarray] = {}
        for name, field in all_fields.items():
            spec = meta["fields"][name]
            if field.variable:
                key = f"{name}.offsets"
                if key not in meta["arrays"]:
                    raise DatasetFormatError(f"{self.idx_path}: field {name!r} has no offsets array")
                off = _index_array(meta, raw, key).astype(np.int64, copy=False)
                where = meta["arrays"][key][0]
                if len(off) != self.count + 1:
                    raise DatasetFormatError(
                        f"{self.idx_path}: at byte {where}: {key} has {len(off)} entries, expected "
                        f"{self.count + 1}"
                    )
                rows = spec["elems"] // max(field.row_elems, 1)
                steps = np.diff(off)
                if off[0] != 0 or off[-1] != rows or (len(steps) and steps.min() < 0):
                    bad_at = int(np.argmax(steps < 0)) if len(steps) and steps.min() < 0 else 0
                    raise DatasetFormatError(
                        f"{self.idx_path}: at byte {where + 8 * bad_at}: {key} must rise from 0 to "
                        f"{rows}, found {int(off[0])}..{int(off[-1])} (non-decreasing: "
                        f"{bool(not len(steps) or steps.min() >= 0)})"
                    )
                self._offsets[name] = off
            elif spec["elems"] != self.count * field.row_elems:
                raise DatasetFormatError(
                    f"{self.idx_path}: field {name!r} holds {spec['elems']} elements, expected "
                    f"{self.count} x {field.row_elems}"
                )
            itemsize = np.dtype(field.dtype).itemsize
            end = spec["offset"] + spec["elems"] * itemsize
            if (
                spec["offset"] < BIN_HEADER
                or spec["nbytes"] != spec["elems"] * itemsize
                or end > meta["bin_size"]
            ):
                raise DatasetFormatError(
                    f"{self.idx_path}: field {name!r} region {spec['offset']}..{end} does not fit "
                    f"the data file's {meta['bin_size']} bytes"
                )
        self._chunk_crcs = (
            _index_array(meta, raw, "chunk_crc32").copy() if "chunk_crc32" in meta["arrays"] else None
        )
        self._lengths_cache: dict[str, np.ndarray] = {}
        self._regions: dict[str, np.ndarray] | None = None
        self._mm: mmap.mmap | None = None
        self._open()  # validates the data file now; workers map it again after unpickling

    # -- mapping -------------------------------------------------------------------------------------

    def _open(self) -> dict[str, np.ndarray]:
        path = self.bin_path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DatasetFormatError(f"{path}: data file not found (its index is {self.idx_path})") from None
        try:
            size = os.fstat(fd).st_size
            expected = int(self.meta["bin_size"])
            if size != expected:
                raise DatasetFormatError(
                    f"{path}: at byte {min(size, expected)}: file has {size} bytes, the index expects "
                    f"{expected} ({'truncated' if size < expected else 'extra data'})"
                )
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else None
        finally:
            os.close(fd)
        head = bytes(mm[:BIN_HEADER]) if mm is not None else b""
        if head[:8] != BIN_MAGIC:
            raise DatasetFormatError(f"{path}: at byte 0: expected magic {BIN_MAGIC!r}, found {head[:8]!r}")
        (version,) = struct.unpack("<I", head[8:12])
        if version != FORMAT_VERSION:
            raise DatasetFormatError(
                f"{path}: at byte 8: format version {version}, this torchkiln reads version {FORMAT_VERSION}"
            )
        if head[12:16] != b"\0" * 4 or head[32:BIN_HEADER] != b"\0" * (BIN_HEADER - 32):
            raise DatasetFormatError(f"{path}: at byte 12: reserved header bytes must be zero")
        if head[16:32] != self.token:
            raise DatasetFormatError(
                f"{path}: at byte 16: token {head[16:32].hex()} does not match the index's "
                f"{self.token.hex()} "
                f"({self.idx_path} belongs to another data file)"
            )
        regions = {}
        for name, field in self.all_fields.items():
            spec = self.meta["fields"][name]
            flat = np.frombuffer(mm, dtype=np.dtype(field.dtype), count=spec["elems"], offset=spec["offset"])
            if field.variable:
                regions[name] = flat.reshape(-1, *field.inner)
            else:
                regions[name] = flat.reshape(self.count, *field.shape)
        self._mm = mm
        self._regions = regions
        return regions

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_regions"] = None
        state["_mm"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def close(self) -> None:
        """Drop this object's reference to the mapping (unmapped once no tensor uses it)."""
        self._regions = None
        self._mm = None

    # -- access --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}:{f.dtype}{f.shape}" for n, f in self.fields.items())
        return f"IndexedDataset({str(self.stem)!r}, n={self.count}, fields={fields})"

    def _index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"index {index} out of range for a dataset of {self.count} samples")
        return i

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = self._index(index)
        regions = self._regions if self._regions is not None else self._open()
        out = {}
        for name, field in self.fields.items():
            if field.variable:
                off = self._offsets[name]
                out[name] = torch.from_numpy(regions[name][off[i] : off[i + 1]])
            else:
                out[name] = torch.from_numpy(regions[name][i, ...])
        return out

    def _checked(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -self.count or idx.max() >= self.count):
            bad = idx[(idx < -self.count) | (idx >= self.count)][0]
            raise IndexError(f"index {int(bad)} out of range for a dataset of {self.count} samples")
        return np.where(idx < 0, idx + self.count, idx)

    def _gather_var(self, name: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All rows of the samples ``idx`` of variable field ``name``, concatenated, and their lengths."""
        region = (self._regions if self._regions is not None else self._open())[name]
        off = self._offsets[name]
        starts = off[idx]
        lengths = off[idx + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return region[:0].copy(), lengths
        # flat positions: starts[k] + (0..lengths[k]-1) for each k, without a Python loop
        ends = np.cumsum(lengths)
        pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)
        return region[pos], lengths

    def __getitems__(self, indices: Sequence[int]) -> SampleBatch:
        """A batch in one call (the DataLoader's ``__getitems__`` contract: a sequence of per-sample
        dicts). Fixed fields are gathered with one numpy fancy-index per field into ``(B, *shape)``
        tensors; variable fields stay zero-copy views of the mapping, like ``ds[i]``.

        The result is a :class:`SampleBatch`: it reads as a list of per-sample dicts (so any
        ``collate_fn`` works), and :func:`collate_samples` -- the collate torchkiln's loaders use for
        this dataset -- returns its gathered columns directly instead of re-stacking samples."""
        idx = self._checked(indices)
        regions = self._regions if self._regions is not None else self._open()
        columns: dict[str, Any] = {}
        for name, field in self.fields.items():
            if field.variable:  # zero-copy views: slicing beats copying bytes into a batch buffer
                off, region = self._offsets[name], regions[name]
                columns[name] = [
                    torch.from_numpy(region[s:e])
                    for s, e in zip(off[idx].tolist(), off[idx + 1].tolist(), strict=True)
                ]
            else:
                columns[name] = torch.from_numpy(regions[name][idx])
        return SampleBatch(columns, len(idx))

    def get_batch(self, indices: Sequence[int], *, pad_value: int | float = 0) -> dict[str, torch.Tensor]:
        """A collated batch: fixed fields stacked ``(B, *shape)``; variable fields padded to the longest
        sample ``(B, L, ...)`` with ``pad_value``, plus ``"<name>_lengths"`` (int64)."""
        idx = self._checked(indices)
        regions = self._regions if self._regions is not None else self._open()
        out: dict[str, torch.Tensor] = {}
        for name, field in self.fields.items():
            if field.variable:
                off, region = self._offsets[name], regions[name]
                starts = off[idx]
                lengths = off[idx + 1] - starts
                width = int(lengths.max()) if len(lengths) else 0
                padded = np.full((len(idx), width, *field.inner), pad_value, dtype=region.dtype)
                for row, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
                    padded[row, :n] = region[s : s + n]  # one memcpy per sample
                out[name] = torch.from_numpy(padded)
                out[f"{name}_lengths"] = torch.from_numpy(lengths.astype(np.int64))
            else:
                out[name] = torch.from_numpy(regions[name][idx])
        return out

    @property
    def default_collate_fn(self) -> Any:
        """:func:`collate_samples` when every field has a fixed shape (the batch is gathered in one call
        and kept as is); None when a field has variable length (padding needs a padding collate)."""
        return None if any(f.variable for f in self.fields.values()) else collate_samples

    def lengths(self, field: str | None = None) -> np.ndarray:
        """Per-sample lengths (int64) of a variable-length field (default: the first one)."""
        if field is None:
            var = [n for n, f in self.all_fields.items() if f.variable]
            if not var:
                raise ValueError(f"{self.stem}: no variable-length field; fields: {list(self.all_fields)}")
            field = var[0]
        if field not in self.all_fields:
            raise KeyError(f"{self.stem}: no field {field!r}; the dataset has {list(self.all_fields)}")
        if not self.all_fields[field].variable:
            raise ValueError(f"{self.stem}: field {field!r} has fixed shape {self.all_fields[field].shape}")
        if field not in self._lengths_cache:
            self._lengths_cache[field] = np.diff(self._offsets[field])
        return self._lengths_cache[field]

    @property
    def nbytes(self) -> int:
        return int(self.meta["bin_size"])


# ------------------------------------------------------------------------------------------- verify


def verify_indexed_dataset(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a dataset fully: everything opening checks, then the crc32 of every chunk of ``P.bin``
    (when the index has checksums). Returns a summary; raises :class:`DatasetFormatError`."""
    ds = IndexedDataset(path)
    checked = 0
    if ds._chunk_crcs is not None:
        chunk = int(ds.meta["chunk_size"])
        expected_chunks = (ds.nbytes + chunk - 1) // chunk
        if len(ds._chunk_crcs) != expected_chunks:
            raise DatasetFormatError(
                f"{ds.idx_path}: {len(ds._chunk_crcs)} chunk checksums, expected {expected_chunks}"
            )
        with open(ds.bin_path, "rb") as fh:
            for k, want in enumerate(ds._chunk_crcs):
                data = fh.read(chunk)
                got = zlib.crc32(data)
                if got != int(want):
                    raise DatasetFormatError(
                        f"{ds.bin_path}: at bytes {k * chunk}..{k * chunk + len(data)}: crc32 "
                        f"{got:08x}, the index expects {int(want):08x} (the data is corrupt)"
                    )
                checked += len(data)
    return {
        "path": str(ds.stem),
        "count": ds.count,
        "fields": {n: f"{f.dtype}{f.shape}" for n, f in ds.all_fields.items()},
        "bytes": ds.nbytes,
        "checksummed_bytes": checked,
        "checksums": ds._chunk_crcs is not None,
    }


def copy_dataset(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a dataset's two files (data first, index last)."""
    _, si, sb = dataset_paths(src)
    _, di, db = dataset_paths(dst)
    shutil.copyfile(sb, db)
    shutil.copyfile(si, di)
