"""What an exported artifact takes and returns (``TensorSpec``), the JSON sidecar beside every artifact,
flattening of model outputs into named tensors, and atomic writes.

>>> spec = TensorSpec("x", "float32", (None, 1, 8, 8))
>>> spec.to_dict()
{'name': 'x', 'dtype': 'float32', 'shape': [None, 1, 8, 8]}
>>> TensorSpec.from_dict(spec.to_dict()) == spec
True
>>> sidecar_path("out/model.onnx").name
'model.onnx.kiln.json'
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkiln.errors import KilnError

__all__ = [
    "SIDECAR_SUFFIX",
    "SIDECAR_VERSION",
    "ExportError",
    "TensorSpec",
    "atomic_directory",
    "flatten_outputs",
    "input_names_of",
    "read_sidecar",
    "sidecar_path",
    "write_json_atomic",
]

SIDECAR_SUFFIX = ".kiln.json"
SIDECAR_VERSION = 1


class ExportError(KilnError, RuntimeError):
    """An export or a load failed: unsupported inputs, a missing dependency or compiler, a bad artifact."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an artifact: its name, dtype (``"float32"``, ``"int64"``...) and shape, with
    ``None`` for a dynamic dimension (the batch, by default)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, dynamic_batch: bool) -> TensorSpec:
        shape: list[int | None] = list(tensor.shape)
        if dynamic_batch and shape:
            shape[0] = None
        return cls(name, dtype_name(tensor.dtype), tuple(shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``.

    >>> dtype_name(torch.int64)
    'int64'
    """
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ExportError(f"unknown dtype {name!r} in an artifact's sidecar; expected e.g. float32, int64")
    return value


def input_names_of(model: torch.nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` positional parameters of ``model.forward`` (``input_<i>`` past them).

    A wrapper whose forward takes only ``*args`` and that holds the wrapped model as ``.module`` (autocast,
    memory-format wrappers) is looked through, so its artifact keeps the model's input names.
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    inner = getattr(model, "module", None)
    if params and all(p.kind == p.VAR_POSITIONAL for p in params) and isinstance(inner, torch.nn.Module):
        return input_names_of(inner, count)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:count]
    names += [f"input_{i}" for i in range(len(names), count)]
    return names


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten_outputs(output: Any, where: str = "the model") -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a model output: a tensor (``"output"``), a tuple/list (``"output_0"``...),
    a dict or Hugging Face ``ModelOutput`` (its keys; nested parts joined with ``.``).

    >>> flatten_outputs(torch.ones(1))[0]
    ['output']
    >>> flatten_outputs((torch.ones(1), {"a": torch.ones(1)}))[0]
    ['output_0', 'output_1.a']
    """
    pairs, _ = pytree.tree_flatten_with_path(output)
    if not pairs:
        raise ExportError(f"{where} returned no tensors ({type(output).__name__}); nothing to export")
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for path, leaf in pairs:
        if leaf is None:
            continue
        if not isinstance(leaf, torch.Tensor):
            raise ExportError(
                f"{where} returns a {type(leaf).__name__} at {pytree.keystr(path) or 'the top level'}; "
                "exported models return tensors (a tensor, a tuple/list or dict of tensors)"
            )
        parts = [_key_name(k) for k in path]
        if not parts:
            name = "output"
        elif isinstance(output, (tuple, list)):
            name = "output_" + ".".join(parts)
        else:
            name = ".".join(parts)
        names.append(name)
        tensors.append(leaf)
    if not tensors:
        raise ExportError(f"{where} returned only None values; nothing to export")
    return names, tensors


# ------------------------------------------------------------------------------------------------ sidecar


def sidecar_path(artifact: str | os.PathLike[str]) -> Path:
    """``<artifact>.kiln.json``: where the sidecar of an artifact lives."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SIDECAR_SUFFIX)


def read_sidecar(artifact: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of ``artifact`` as a dict, or None when there is none."""
    path = sidecar_path(artifact)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the sidecar {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or "format" not in data:
        raise ExportError(f"{path} is not a torchkiln export sidecar (no 'format' key)")
    return data


def write_json_atomic(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``data`` as JSON to a temp file beside ``path``, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """A private temp directory beside ``final`` (same file system, so renames out of it are atomic),
    removed with everything left in it when the block ends, whether it succeeded or not."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())
