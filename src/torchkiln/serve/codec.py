"""Request and response bodies: JSON and NumPy ``.npy``/``.npz`` bytes, each request checked on its own.

A request carries one sample (no batch dimension; a leading dimension of 1 is accepted and dropped):

- JSON ``{"inputs": {"x": [[...]]}}`` by input name, or ``{"inputs": [...]}`` (the single input's data,
  or one entry per input in order);
- ``application/x-npy``: one array, for a model with one input; ``application/x-npz``: arrays by name.

Every problem raises :class:`RequestError` naming the field (``inputs.idx``), what was wrong and what is
accepted; the server answers it with a 4xx without touching any other request.

>>> import torch
>>> from torchkiln.serve.model import TensorSpec
>>> specs = [TensorSpec("x", torch.float32, (2,))]
>>> decode_json(b'{"inputs": {"x": [1, 2]}}', specs)["x"]
tensor([1., 2.])
>>> try:
...     decode_json(b'{"inputs": {"x": [1, 2, 3]}}', specs)
... except RequestError as e:
...     print(e.status, e.field, e.message)
422 inputs.x dimension 0 has size 3; the model takes exactly 2 (per-sample shape [2])
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from torchkiln.serve.model import TensorSpec, dtype_name

__all__ = [
    "JSON",
    "NPY",
    "NPZ",
    "RequestError",
    "decode_json",
    "decode_npy",
    "decode_npz",
    "decode_request",
    "encode_outputs",
]

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"


class RequestError(Exception):
    """A bad request: HTTP ``status``, the ``field`` at fault, a ``message`` and an error ``kind``."""

    def __init__(self, status: int, field: str, message: str, kind: str = "invalid_input") -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message
        self.kind = kind

    def to_json(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "field": self.field, "message": self.message}}


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_tensor(value: torch.Tensor, spec: TensorSpec, field: str) -> torch.Tensor:
    """Shape, size and value checks of one input against its spec; returns it with the spec's dtype."""
    want = len(spec.shape)
    if value.dim() == want + 1 and value.shape[0] == 1:
        value = value[0]
    shape_text = "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"
    if value.dim() != want:
        raise RequestError(
            422,
            field,
            f"has {value.dim()} dimension(s) (shape {list(value.shape)}); the model takes one sample of "
            f"per-sample shape {shape_text}",
        )
    for d, size in enumerate(value.shape):
        fixed = spec.shape[d]
        if fixed is not None and size != fixed:
            raise RequestError(
                422,
                field,
                f"dimension {d} has size {size}; the model takes exactly {fixed} "
                f"(per-sample shape {shape_text})",
            )
        if fixed is None:
            limit = spec.limit(d)
            if size < 1:
                raise RequestError(422, field, f"dimension {d} is empty; send at least one element")
            if limit is not None and size > limit:
                raise RequestError(
                    422,
                    field,
                    f"dimension {d} has size {size}; at most {limit} accepted",
                    kind="too_large",
                )
    if _is_int(spec.dtype):
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise RequestError(
                422, field, f"holds non-integer numbers; the model takes {dtype_name(spec.dtype)}"
            )
        if value.numel() and (spec.low is not None or spec.high is not None):
            lo, hi = int(value.min()), int(value.max())
            if spec.low is not None and lo < spec.low:
                raise RequestError(422, field, f"holds {lo}; values must be >= {spec.low:g}")
            if spec.high is not None and hi >= spec.high:
                raise RequestError(422, field, f"holds {hi}; values must be < {spec.high:g}")
    elif spec.dtype.is_floating_point and value.dtype.is_floating_point and value.numel():
        if not bool(torch.isfinite(value).all()):
            raise RequestError(422, field, "holds NaN or infinity; send finite numbers")
    if value.dtype != spec.dtype:
        value = value.to(spec.dtype)
    return value


def _from_json_value(data: Any, spec: TensorSpec, field: str) -> torch.Tensor:
    if isinstance(data, (str, dict)) or data is None:
        raise RequestError(
            422,
            field,
            f"is a {type(data).__name__}; send a (nested) list of numbers of dtype {dtype_name(spec.dtype)}",
        )
    try:
        value = torch.tensor(data)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        reason = str(exc).split("\n", 1)[0]
        raise RequestError(
            422,
            field,
            f"is not a rectangular array of numbers ({reason}); send a nested list of numbers "
            f"of dtype {dtype_name(spec.dtype)}",
        ) from None
    return check_tensor(value, spec, field)


def decode_json(body: bytes, specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    """``{"inputs": {...}}`` or ``{"inputs": [...]}`` -> tensors by input name."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, "body", f"is not valid JSON ({exc})", kind="bad_json") from None
    if isinstance(doc, list):
        doc = {"inputs": doc}
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(
            422,
            "inputs",
            'is missing; send {"inputs": {"<name>": [...]}} or {"inputs": [...]}',
            kind="missing_field",
        )
    inputs = doc["inputs"]
    names = [s.name for s in specs]
    if isinstance(inputs, list):
        if len(specs) == 1:
            inputs = {specs[0].name: inputs}
        elif len(inputs) == len(specs):
            inputs = dict(zip(names, inputs, strict=True))
        else:
            raise RequestError(
                422,
                "inputs",
                f"is a list of {len(inputs)} entries; the model takes {len(specs)} inputs "
                f"({', '.join(names)}): send one entry per input or an object by name",
            )
    if not isinstance(inputs, dict):
        raise RequestError(422, "inputs", f"is a {type(inputs).__name__}; send an object by input name")
    unknown = [k for k in inputs if k not in names]
    if unknown:
        raise RequestError(
            422,
            f"inputs.{unknown[0]}",
            f"is not an input of this model; accepted: {', '.join(names)}",
            kind="unknown_field",
        )
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise RequestError(422, f"inputs.{spec.name}", "is missing", kind="missing_field")
        out[spec.name] = _from_json_value(inputs[spec.name], spec, f"inputs.{spec.name}")
    return out


def _from_array(array: np.ndarray, spec: TensorSpec, field: str) -> torch.Tensor:
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise RequestError(422, field, f"has dtype {array.dtype}; send {dtype_name(spec.dtype)}")
    return check_tensor(torch.from_numpy(np.ascontiguousarray(array)), spec, field)


def decode_npy(body: bytes, specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    """One ``.npy`` array, for a model with a single input."""
    if len(specs) != 1:
        raise RequestError(
            415,
            "body",
            f"is one .npy array but the model takes {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}); send application/x-npz with arrays by name",
            kind="unsupported_media_type",
        )
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
        raise RequestError(400, "body", f"is not a .npy array ({exc})", kind="bad_npy") from None
    if not isinstance(array, np.ndarray):
        raise RequestError(400, "body", "is not a single .npy array", kind="bad_npy")
    return {specs[0].name: _from_array(array, specs[0], f"inputs.{specs[0].name}")}


def decode_npz(body: bytes, specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    """An ``.npz`` archive with one array per input name."""
    try:
        archive = np.load(io.BytesIO(body), allow_pickle=False)
        arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:  # noqa: BLE001
        raise RequestError(400, "body", f"is not a .npz archive ({exc})", kind="bad_npz") from None
    names = [s.name for s in specs]
    unknown = [k for k in arrays if k not in names]
    if unknown:
        raise RequestError(
            422,
            f"inputs.{unknown[0]}",
            f"is not an input of this model; accepted: {', '.join(names)}",
            kind="unknown_field",
        )
    out = {}
    for spec in specs:
        if spec.name not in arrays:
            raise RequestError(422, f"inputs.{spec.name}", "is missing", kind="missing_field")
        out[spec.name] = _from_array(arrays[spec.name], spec, f"inputs.{spec.name}")
    return out


def decode_request(
    body: bytes, content_type: str | None, specs: Sequence[TensorSpec]
) -> dict[str, torch.Tensor]:
    """Dispatch on the content type (JSON when absent)."""
    kind = (content_type or JSON).split(";", 1)[0].strip().lower()
    if kind in (JSON, "text/json", "", "*/*", "text/plain"):
        return decode_json(body, specs)
    if kind in (NPY, "application/octet-stream"):
        return decode_npy(body, specs)
    if kind == NPZ:
        return decode_npz(body, specs)
    raise RequestError(
        415,
        "content-type",
        f"{kind!r} is not accepted; send {JSON}, {NPY} or {NPZ}",
        kind="unsupported_media_type",
    )


def encode_outputs(outputs: Mapping[str, torch.Tensor], accept: str | None) -> tuple[bytes, str]:
    """Response body and media type: JSON ``{"outputs": {...}}`` unless ``accept`` asks for npy/npz."""
    kinds = (accept or "").lower()
    if NPY in kinds and len(outputs) == 1:
        buf = io.BytesIO()
        np.save(buf, _to_numpy(next(iter(outputs.values()))))
        return buf.getvalue(), NPY
    if NPZ in kinds or NPY in kinds:
        buf = io.BytesIO()
        np.savez(buf, **{k: _to_numpy(v) for k, v in outputs.items()})
        return buf.getvalue(), NPZ
    body = {k: v.tolist() for k, v in outputs.items()}
    return json.dumps({"outputs": body}, allow_nan=True, separators=(",", ":")).encode(), JSON


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()
