"""What the server runs: a thin adapter over a model callable and its input spec.

:class:`ServedModel` wraps anything called as ``fn(*tensors)`` -- an ``nn.Module`` or a
``torchkiln.export`` Predictor -- with the names, dtypes and per-sample shapes of its inputs. It turns a
list of per-request inputs into one batch (padding dynamic dimensions, building the attention mask the
padding needs, optionally padding the batch to a bucket size) and the batch's outputs back into one
result per request (padding removed).

:func:`load_served_model` resolves what ``kiln serve`` is given: an exported artifact (through
``torchkiln.export.load_predictor`` where that package exists), a zoo model name or user factory
(``pkg.mod:fn``, ``file.py:fn``), a recipe ``.toml``, or a ``kiln train`` ``model.pt`` with the model name
that built it.

>>> import torch
>>> served = ServedModel(lambda x: x * 2, [TensorSpec("x", torch.float32, (3,))])
>>> outs = served.run_batch([{"x": torch.ones(3)}, {"x": torch.zeros(3)}])
>>> [o["output"].tolist() for o in outs]
[[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.errors import KilnError

__all__ = [
    "MASK_NAMES",
    "ServedModel",
    "TensorSpec",
    "dtype_name",
    "load_served_model",
    "parse_dtype",
    "specs_from_module",
]

# Inputs the adapter fills itself when the client leaves them out and a dynamic dimension is padded.
MASK_NAMES = ("attention_mask",)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def parse_dtype(value: Any) -> torch.dtype:
    """A torch dtype from a dtype, a name (``"float32"``, ``"torch.int64"``) or a numpy dtype.

    >>> parse_dtype("torch.int64"), parse_dtype("float")
    (torch.int64, torch.float32)
    """
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise KilnError(f"unknown dtype {value!r}; accepted: {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """One model input, per sample (no batch dimension): ``None`` in ``shape`` marks a dynamic dimension,
    at most ``max_shape[i]`` long. ``high`` (exclusive) bounds integer values, e.g. a vocabulary size."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | None, ...]
    max_shape: tuple[int | None, ...] | None = None
    low: float | None = None
    high: float | None = None
    pad_value: float = 0

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if d is None)

    def limit(self, dim: int) -> int | None:
        if self.shape[dim] is not None:
            return self.shape[dim]
        return None if self.max_shape is None else self.max_shape[dim]

    def max_elements(self) -> int | None:
        """The largest element count a request may send for this input (None: unbounded)."""
        total = 1
        for i in range(len(self.shape)):
            lim = self.limit(i)
            if lim is None:
                return None
            total *= lim
        return total

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape)}
        if self.max_shape is not None:
            out["max_shape"] = list(self.max_shape)
        if self.low is not None:
            out["low"] = self.low
        if self.high is not None:
            out["high"] = self.high
        return out


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _outputs_to_dict(out: Any, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {names[0] if names else "output": out}
    if isinstance(out, Mapping):  # dicts and Hugging Face ModelOutput
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        tensors = [o for o in out if isinstance(o, torch.Tensor)]
        if names and len(names) == len(tensors):
            return dict(zip(names, tensors, strict=True))
        return {f"output_{i}": t for i, t in enumerate(tensors)}
    raise TypeError(
        f"the model returned {type(out).__name__}; expected a tensor, a tuple or a dict of tensors"
    )


@dataclass
class ServedModel:
    """A callable model plus what the server needs to batch requests for it.

    ``fn(*tensors)`` takes the inputs in ``inputs`` order, batched. ``outputs`` selects which outputs to
    return (default: all). ``batch_buckets`` are the batch sizes warmed up; with ``pad_batch`` a batch is
    padded up to the next bucket (for artifacts compiled for fixed batch sizes).
    """

    fn: Callable[..., Any]
    inputs: list[TensorSpec]
    output_names: list[str] | None = None
    outputs: list[str] | None = None
    name: str = "model"
    format: str = "eager"
    batch_buckets: tuple[int, ...] = ()
    pad_batch: bool = False
    threads: int | None = None
    _seq_dims: dict[str, tuple[str, int, int] | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.inputs]
        if len(set(names)) != len(names):
            raise KilnError(f"input names must be unique, got {names}")

    # ----------------------------------------------------------------------------- requests -> batch

    @property
    def client_inputs(self) -> list[TensorSpec]:
        """Inputs a client sends: every input except a mask the adapter can build from the padding."""
        padded = any(s.dynamic_dims for s in self.inputs)
        return [s for s in self.inputs if not (padded and s.name in MASK_NAMES)]

    def collate(self, requests: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[torch.Tensor], dict]:
        """Stack per-request inputs into batch tensors, padding dynamic dims to the longest request.

        Returns the tensors in ``inputs`` order and the padding info ``split`` needs.
        """
        n = len(requests)
        size = n
        if self.pad_batch and self.batch_buckets:
            size = next((b for b in sorted(self.batch_buckets) if b >= n), n)
        lengths: dict[str, list[tuple[int, ...]]] = {}
        tensors: list[torch.Tensor] = []
        padded_to: dict[str, tuple[int, ...]] = {}
        for spec in self.inputs:
            given = [r.get(spec.name) for r in requests]
            if any(t is None for t in given):
                if spec.name in MASK_NAMES and all(t is None for t in given):
                    tensors.append(None)  # built below, from the padding of the other inputs
                    continue
                missing = next(i for i, t in enumerate(given) if t is None)
                raise ValueError(f"request {missing} of the batch lacks input {spec.name!r}")
            shapes = [tuple(t.shape) for t in given]
            target = tuple(max(s[d] for s in shapes) for d in range(len(spec.shape)))
            lengths[spec.name] = shapes
            padded_to[spec.name] = target
            if size == n and all(s == target for s in shapes):
                tensors.append(torch.stack(given) if n > 1 else given[0].unsqueeze(0))
                continue
            batch = torch.full((size, *target), spec.pad_value, dtype=spec.dtype)
            for i, t in enumerate(given):
                batch[(i, *[slice(0, k) for k in t.shape])] = t
            if size > n:
                batch[n:] = batch[0]
            tensors.append(batch)
        # The mask: 1 for real positions along the first dynamic dim of the first dynamic input.
        for i, spec in enumerate(self.inputs):
            if tensors[i] is not None:
                continue
            source = next((s for s in self.inputs if s.dynamic_dims and s.name in lengths), None)
            if source is None:
                raise ValueError(f"input {spec.name!r} is missing and there is no padding to build it from")
            dim = source.dynamic_dims[0]
            total = padded_to[source.name][dim]
            mask = torch.zeros(size, total, dtype=spec.dtype)
            for j, shape in enumerate(lengths[source.name]):
                mask[j, : shape[dim]] = 1
            if size > n:
                mask[n:] = mask[0]
            tensors[i] = mask
        return tensors, {"n": n, "lengths": lengths, "padded_to": padded_to}

    def split(self, outputs: Any, info: dict) -> list[dict[str, torch.Tensor]]:
        """Per-request outputs: row ``i`` of each output, with the padding of dynamic dims cut off."""
        named = _outputs_to_dict(outputs, self.output_names)
        if self.outputs:
            unknown = [o for o in self.outputs if o not in named]
            if unknown:
                raise KilnError(f"unknown output(s) {unknown}; the model returns {sorted(named)}")
            named = {k: named[k] for k in self.outputs}
        results: list[dict[str, torch.Tensor]] = [{} for _ in range(info["n"])]
        for key, value in named.items():
            seq = self._seq_dims.get(key)
            for i in range(info["n"]):
                row = value[i]
                if seq is not None:
                    source, in_dim, out_dim = seq
                    row = row.narrow(out_dim, 0, info["lengths"][source][i][in_dim])
                results[i][key] = row
        return results

    def run_batch(self, requests: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Collate, call the model, split: what the batcher's worker thread runs."""
        tensors, info = self.collate(requests)
        return self.split(self.fn(*tensors), info)

    # ----------------------------------------------------------------------------- warm-up

    def example_request(self, length: int | None = None) -> dict[str, torch.Tensor]:
        """One request's inputs: zeros (or ``low``) of each input's shape; dynamic dims ``length`` long
        (default: their maximum, or 8)."""
        out: dict[str, torch.Tensor] = {}
        for spec in self.client_inputs:
            shape = []
            for d in range(len(spec.shape)):
                if spec.shape[d] is not None:
                    shape.append(spec.shape[d])
                else:
                    lim = spec.limit(d) or 8
                    shape.append(min(length, lim) if length is not None else lim)
            value = spec.low if spec.low is not None else 0
            out[spec.name] = torch.full(shape, value, dtype=spec.dtype)
        return out

    def warmup(self, batch_sizes: Sequence[int] | None = None, rounds: int = 2) -> list[int]:
        """Run every batch size (default: the buckets) ``rounds`` times; learn which output dims follow
        the padded input dims. Returns the batch sizes run."""
        sizes = sorted(set(batch_sizes or self.batch_buckets or (1,)))
        dynamic = [s for s in self.client_inputs if s.dynamic_dims]
        if dynamic:
            self._learn_sequence_dims(dynamic[0])
        with torch.inference_mode():
            for size in sizes:
                request = self.example_request()
                for _ in range(rounds):
                    self.run_batch([request] * size)
        return sizes

    def _learn_sequence_dims(self, source: TensorSpec) -> None:
        """Which output dim (if any) tracks the first dynamic dim of ``source``: run two lengths and
        compare output shapes."""
        dim = source.dynamic_dims[0]
        longest = source.limit(dim) or 8
        a, b = max(1, min(3, longest - 1)), longest
        self._seq_dims = {}
        with torch.inference_mode():
            outs = []
            for length in (a, b):
                tensors, _ = self.collate([self.example_request(length)])
                outs.append(_outputs_to_dict(self.fn(*tensors), self.output_names))
        for key, ta in outs[0].items():
            tb = outs[1][key]
            found = None
            if a != b and ta.dim() == tb.dim():
                for d in range(1, ta.dim()):
                    if ta.shape[d] == a and tb.shape[d] == b:
                        found = (source.name, dim, d - 1)
                        break
            self._seq_dims[key] = found

    def spec(self) -> dict[str, Any]:
        """The JSON description clients read at ``/v1/spec``."""
        return {
            "name": self.name,
            "format": self.format,
            "inputs": [s.to_json() for s in self.client_inputs],
            "model_inputs": [s.name for s in self.inputs],
            "outputs": self.outputs or self.output_names,
            "batch_buckets": list(self.batch_buckets),
        }


# --------------------------------------------------------------------------------- building one


def specs_from_module(model: nn.Module, example: Sequence[torch.Tensor] | None = None) -> list[TensorSpec]:
    """Input specs of an ``nn.Module`` from its ``example_inputs(batch_size)`` and ``forward`` signature.

    Names come from ``forward``'s parameters. An integer input of shape ``(batch, T)`` (token ids) gets a
    dynamic ``T``, at most the example's length (or ``model.seq_len``); values below ``model.vocab_size``
    when the model has one. Everything else keeps the example's per-sample shape.
    """
    if example is None:
        make = getattr(model, "example_inputs", None)
        if not callable(make):
            raise KilnError(
                f"{type(model).__name__} has no example_inputs(batch_size) method, so the server cannot "
                "tell its input shapes; add one, or serve an exported artifact (kiln export)"
            )
        example = make(2)
    if isinstance(example, torch.Tensor):
        example = (example,)
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    specs: list[TensorSpec] = []
    for i, t in enumerate(example):
        name = params[i] if i < len(params) else f"input_{i}"
        per_sample = tuple(t.shape[1:])
        if _is_int(t.dtype) and t.dim() == 2 and name in MASK_NAMES:
            longest = int(getattr(model, "seq_len", 0) or per_sample[0])
            specs.append(TensorSpec(name, t.dtype, (None,), max_shape=(longest,)))
        elif _is_int(t.dtype) and t.dim() == 2:
            longest = int(getattr(model, "seq_len", 0) or per_sample[0])
            vocab = getattr(model, "vocab_size", None)
            specs.append(TensorSpec(name, t.dtype, (None,), max_shape=(longest,), low=0, high=vocab))
        else:
            specs.append(TensorSpec(name, t.dtype, per_sample))
    # A model taking a mask next to dynamic token ids: expose it so collate fills it from the padding.
    if any(s.dynamic_dims for s in specs) and not any(s.name in MASK_NAMES for s in specs):
        for name in MASK_NAMES:
            if name in params:
                ids = next(s for s in specs if s.dynamic_dims)
                index = params.index(name)
                if index == len(specs):
                    specs.append(TensorSpec(name, torch.int64, (None,), max_shape=ids.max_shape))
                break
    return specs


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself.

    >>> bucket_sizes(12)
    (1, 2, 4, 8, 12)
    """
    sizes = [2**i for i in range(int(math.log2(max_batch_size)) + 1) if 2**i <= max_batch_size]
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return tuple(sizes)


def _from_predictor(predictor: Any, name: str) -> ServedModel:
    specs = []
    for entry in predictor.input_specs:
        if isinstance(entry, Mapping):
            spec_name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        elif hasattr(entry, "name"):
            spec_name, dtype, shape = entry.name, entry.dtype, entry.shape
        else:
            spec_name, dtype, shape = entry
        shape = tuple(None if d is None or isinstance(d, str) else int(d) for d in shape)
        specs.append(TensorSpec(spec_name, parse_dtype(dtype), shape[1:], max_shape=None))
    return ServedModel(
        predictor,
        specs,
        output_names=list(getattr(predictor, "output_names", None) or []) or None,
        name=name,
        format=str(getattr(predictor, "format", "predictor")),
        threads=getattr(predictor, "threads", None),
    )


def _export_api() -> Any:
    """``torchkiln.export`` when this build has it (it loads every exported format), else None."""
    try:
        import torchkiln.export as export
    except ImportError:
        return None
    return export


_ARTIFACT_SUFFIXES = (".onnx", ".pt", ".pt2", ".pth", ".toml", ".json")


def _is_pruned(path: Path) -> bool:
    from torchkiln.targets import TargetError, target_kind

    try:
        return target_kind(path) == "pruned"
    except TargetError:
        return False


def load_served_model(
    target: str,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    outputs: Sequence[str] | None = None,
) -> ServedModel:
    """Resolve ``kiln serve``'s ARTIFACT into a :class:`ServedModel` (eval mode, no gradients).

    - a ``model.pt`` state dict from ``kiln train``: built as zoo model ``model`` with ``model_args``;
    - a recipe ``.toml``: its model (random weights unless it is given with a ``model.pt``);
    - an exported artifact (file or directory): ``torchkiln.export.load_predictor``;
    - otherwise a zoo model name or user factory (``pkg.mod:fn``, ``path/file.py:fn``).
    """
    from torchkiln.zoo import create_model, is_reference

    args = dict(model_args or {})
    path = Path(target)
    module: nn.Module | None = None
    label = target
    if target.endswith(".toml"):
        from torchkiln.recipe import load_recipe
        from torchkiln.train.from_recipe import build_from_recipe

        if not path.is_file():
            raise KilnError(f"recipe {target} does not exist")
        rec = load_recipe(target, [f"model.args.{k}={v}" for k, v in args.items()])
        module, _, _, _ = build_from_recipe(rec)
        label = rec.name or path.stem
    elif path.exists() and not is_reference(target):
        export = _export_api()
        run_dir = None
        if export is not None:
            from torchkiln.export.models import run_dir_of

            run_dir = run_dir_of(path)
            if run_dir is None and (path.is_dir() or model is None):
                fmt = (export.read_sidecar(path) or {}).get("format") if path.is_file() else None
                fmt = fmt or (export.detect_format(path) if path.is_file() else None)
                if fmt != "eager":  # an exported artifact (or a directory holding one)
                    served = _from_predictor(export.load_predictor(path), path.stem)
                    served.outputs = list(outputs) if outputs else None
                    return served
        if model is None and path.is_file() and _is_pruned(path):
            # a pruned artifact (kiln prune) rebuilds its own re-shaped model
            module = export.resolve_model(path)
            label = path.stem
        elif model is None and run_dir is None:
            raise KilnError(
                f"{target} is a weights file: give the model that made it (--model NAME, e.g. --model "
                "gpt-tiny with --model-arg for its arguments), or serve an exported artifact (kiln export)"
            )
        if module is not None:
            pass
        elif export is not None:
            # Eager modules keep their variable-length inputs (padded with a mask) here, which a
            # Predictor's fixed example shapes would not.
            module = export.resolve_model(path if model is None else model, args or None, weights=path)
            label = model or (run_dir.name if run_dir is not None else path.stem)
        else:
            from torchkiln.train.checkpoint import load_checkpoint, load_model_state

            module = create_model(model, **args)
            state = load_checkpoint(path)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # a full training checkpoint
            load_model_state(module, state, path)
            label = model
    elif not is_reference(target) and (path.suffix in _ARTIFACT_SUFFIXES or "/" in target):
        raise KilnError(
            f"{target}: no such file or directory (expected an exported artifact, a recipe, a run "
            "directory or its model.pt; or a zoo model name)"
        )
    else:
        module = create_model(target, **args)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return ServedModel(
        module, specs_from_module(module), name=label, outputs=list(outputs) if outputs else None
    )
