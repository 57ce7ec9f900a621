"""``load_predictor(path)``: any exported artifact (or a checkpoint plus its model) as one callable.

The interface (the model server builds on it; keep it stable):

- ``predictor(*inputs) -> Tensor | tuple[Tensor, ...]``: positional inputs in ``input_names`` order,
  torch tensors or numpy arrays; outputs are CPU torch tensors (one tensor when the model has one
  output). Inputs are checked against ``input_specs`` (count, dtype, rank, static sizes) and a mismatch
  raises :class:`PredictorInputError` naming the input and what was expected.
- ``format``: ``"torchscript"``, ``"export"``, ``"aoti"``, ``"onnx"`` or ``"eager"``; ``path``.
- ``input_names``, ``input_specs`` (:class:`TensorSpec`: name, dtype, shape with ``None`` for dynamic
  dimensions), ``output_names``.
- ``threads``: intra-op threads. Settable. ONNX Runtime gets its own session option (the session is
  rebuilt); the torch-backed formats share the process-wide ``torch.set_num_threads``. AOTInductor code
  was generated for the thread count at export time (``metadata["threads"]``).
- ``warmup(batch_sizes=(1,))``: run each batch size (twice) on generated inputs.
- ``dummy_inputs(batch_size)``: inputs that match ``input_specs``.
- ``metadata``: the sidecar (``<artifact>.kiln.json``: format, specs, torch version, verification errors).

>>> import tempfile, os, torch, torchkiln as tk
>>> model = tk.create_model("mlp", hidden=(16,))
>>> path = os.path.join(tempfile.mkdtemp(), "mlp.pt")
>>> _ = tk.export(model, model.example_inputs(2), path, format="torchscript", verbose=False)
>>> predictor = load_predictor(path)
>>> predictor.format, predictor.input_names, predictor.input_specs[0].shape
('torchscript', ['x'], (None, 64))
>>> predictor(torch.rand(3, 64)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from torchkiln.export.spec import ExportError, TensorSpec, dtype_name, read_sidecar

__all__ = ["FORMATS", "Predictor", "PredictorInputError", "load_predictor"]

FORMATS = ("torchscript", "export", "aoti", "onnx")


class PredictorInputError(ExportError, ValueError):
    """Inputs given to a predictor do not match its input specs."""


def _ort_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime session on the CPU with torchkiln's session options (``ort_session_options``:
    ``threads`` intra-op threads; the pool spins inside a call and stops when it returns, so a served
    model leaves the cores to request handling between batches, and a predictor timed against torch
    does not slow the torch calls that follow it)."""
    import onnxruntime as ort

    from torchkiln.compress._onnx import ort_session_options

    options = ort_session_options(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _as_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out]
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class Predictor:
    """One exported model behind one call signature (see the module docstring)."""

    def __init__(
        self,
        fmt: str,
        path: str | os.PathLike[str],
        runner: Any,
        input_specs: Sequence[TensorSpec],
        output_names: Sequence[str],
        metadata: dict[str, Any] | None = None,
        *,
        threads: int | None = None,
    ) -> None:
        self.format = fmt
        self.path = Path(path)
        self.input_specs = list(input_specs)
        self.output_names = list(output_names)
        self.metadata = dict(metadata or {})
        self._runner = runner
        self._session = None
        self._threads = threads or torch.get_num_threads()
        if fmt == "onnx":
            self._session = _ort_session(self.path, self._threads)
            self._ort_inputs = [i.name for i in self._session.get_inputs()]
        elif threads is not None:
            torch.set_num_threads(threads)

    # -- interface -------------------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs]

    @property
    def threads(self) -> int:
        return self._threads if self.format == "onnx" else torch.get_num_threads()

    @threads.setter
    def threads(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive integer, got {n!r}")
        self._threads = n
        if self.format == "onnx":
            self._session = _ort_session(self.path, n)
        else:
            torch.set_num_threads(n)

    def __call__(self, *inputs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        tensors = self._check(inputs)
        if self._session is not None:
            feed = {name: t.numpy() for name, t in zip(self._ort_inputs, tensors, strict=True)}
            outs = [torch.from_numpy(o) for o in self._session.run(None, feed)]
        else:
            with torch.inference_mode():
                outs = _as_outputs(self._runner(*tensors))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def dummy_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs matching ``input_specs``: dynamic dimensions set to ``batch_size``, floats uniform in
        [0, 1), integers zero (a valid token id, an all-zero mask), booleans True."""
        out = []
        for spec in self.input_specs:
            shape = [batch_size if d is None else d for d in spec.shape]
            dtype = spec.torch_dtype
            if dtype.is_floating_point:
                out.append(torch.rand(shape, dtype=dtype))
            elif dtype == torch.bool:
                out.append(torch.ones(shape, dtype=dtype))
            else:
                out.append(torch.zeros(shape, dtype=dtype))
        return tuple(out)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run every batch size twice (first-call allocations, thread pools, ORT's arena, shape caches)."""
        if not self.input_specs:
            raise ExportError(f"{self.path}: no input specs are known, so warm-up cannot make inputs")
        for bs in batch_sizes:
            inputs = self.dummy_inputs(int(bs))
            for _ in range(2):
                self(*inputs)

    def __repr__(self) -> str:
        specs = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.input_specs)
        return f"Predictor({self.format}, {self.path}, inputs=({specs}), outputs={self.output_names})"

    # -- internals -------------------------------------------------------------------------------------

    def _check(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        specs = self.input_specs
        if specs and len(inputs) != len(specs):
            raise PredictorInputError(
                f"{self.format} predictor {self.path.name} takes {len(specs)} input(s) "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        tensors = []
        for i, value in enumerate(inputs):
            if isinstance(value, torch.Tensor):
                t = value
            else:
                try:
                    t = torch.as_tensor(value)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise PredictorInputError(
                        f"input {i} is a {type(value).__name__}, not a tensor or array: {exc}"
                    ) from None
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if specs:
                spec = specs[i]
                if dtype_name(t.dtype) != spec.dtype:
                    raise PredictorInputError(
                        f"input {spec.name!r} has dtype {dtype_name(t.dtype)}, expected {spec.dtype}"
                    )
                if t.dim() != len(spec.shape) or any(
                    d is not None and d != n for d, n in zip(spec.shape, t.shape, strict=True)
                ):
                    expected = ["*" if d is None else d for d in spec.shape]
                    raise PredictorInputError(
                        f"input {spec.name!r} has shape {list(t.shape)}, expected {expected} (* = any size)"
                    )
            if self._session is not None and not t.is_contiguous():
                t = t.contiguous()
            tensors.append(t)
        return tensors


# ------------------------------------------------------------------------------------------------ loading


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def detect_format(path: Path) -> str:
    """The format of an artifact without a sidecar, from its suffix and (for zip archives) its contents."""
    if path.suffix == ".onnx":
        return "onnx"
    names = _zip_names(path)
    if any("aotinductor" in n for n in names):
        return "aoti"
    if path.suffix == ".pt2" or any(n.endswith("serialized_exported_program.json") for n in names):
        return "export"
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return "eager"


def _runner(fmt: str, path: Path) -> Callable[..., Any] | None:
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit; the export notes say so once
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\..* is deprecated", category=DeprecationWarning
            )
            module = torch.jit.load(str(path), map_location="cpu")
            # Not serializable, so applied at load (pytorch#69608): oneDNN convs with fused ReLU, folded ops.
            return torch.jit.optimize_for_inference(module)
    if fmt == "export":
        return torch.export.load(str(path)).module()
    if fmt == "aoti":
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(path))
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportError(
                "loading an ONNX artifact needs onnxruntime: pip install 'torchkiln[onnx]'"
            ) from None
        return None
    raise ExportError(f"unknown artifact format {fmt!r}; accepted: {', '.join(FORMATS)}, eager")


def _specs_without_sidecar(fmt: str, path: Path) -> tuple[list[TensorSpec], list[str]]:
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        specs = []
        for value in graph.input:
            ttype = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)
            specs.append(TensorSpec(value.name, dtype, shape))
        return specs, [o.name for o in graph.output]
    raise ExportError(
        f"{path} has no sidecar {path.name}.kiln.json, so its inputs are unknown; export it with tk.export "
        "(or kiln export), which writes one"
    )


def load_predictor(
    path: str | os.PathLike[str],
    *,
    model: Any = None,
    model_args: dict[str, Any] | None = None,
    threads: int | None = None,
) -> Predictor:
    """A :class:`Predictor` for an artifact written by :func:`torchkiln.export` (format from its sidecar),
    or for eager PyTorch: a training run directory / its ``model.pt`` (the run's ``recipe.json`` names the
    model), or a ``state_dict`` file together with ``model`` (zoo name, ``pkg.mod:fn``, ``file.py:fn``,
    recipe, or an ``nn.Module``).

    ``threads`` sets the predictor's intra-op threads (default: ``torch.get_num_threads()``).
    """
    path = Path(path)
    if path.is_dir():
        sidecars = sorted(path.glob("*.kiln.json"))
        if (path / "recipe.json").is_file() or model is not None:
            path = path / "model.pt"
        elif len(sidecars) == 1:
            path = sidecars[0].with_name(sidecars[0].name[: -len(".kiln.json")])
        else:
            raise ExportError(
                f"{path} is a directory with {len(sidecars)} exported artifacts and no recipe.json: "
                "name the artifact file"
            )
    if not path.is_file():
        raise ExportError(f"no artifact at {path}")
    meta = read_sidecar(path)
    fmt = meta["format"] if meta else detect_format(path)
    if not meta and fmt == "export":
        quantized = _quantized_sidecar(path)
        if quantized is not None:
            return _quantized_predictor(path, quantized, threads)
    if fmt == "eager":
        return _eager_predictor(path, model, model_args, threads)
    runner = _runner(fmt, path)
    if meta:
        specs = [TensorSpec.from_dict(s) for s in meta.get("inputs", [])]
        outputs = [o["name"] for o in meta.get("outputs", [])]
    else:
        specs, outputs = _specs_without_sidecar(fmt, path)
    return Predictor(fmt, path, runner, specs, outputs, meta, threads=threads)


def _quantized_sidecar(path: Path) -> dict[str, Any] | None:
    """The ``<artifact>.json`` that ``tk.save_quantized`` writes beside a static int8 ``.pt2``, if any."""
    import json

    side = Path(str(path) + ".json")
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") == "torchkiln-quantized" and meta.get("technique") == "quantize/int8-static":
        return meta
    return None


def _quantized_predictor(path: Path, meta: dict[str, Any], threads: int | None) -> Predictor:
    """A static int8 artifact (``tk.save_quantized``): the converted graph lowered to oneDNN int8 kernels
    again (``tk.load_quantized``), its inputs read from the program's stored example inputs."""
    from torchkiln.compress.quantize import load_quantized

    runner = load_quantized(path)
    program = torch.export.load(str(path))
    args, _ = program.example_inputs
    names = list(program.graph_signature.user_inputs)[: len(args)]
    specs = [TensorSpec.of(n, t, dynamic_batch=True) for n, t in zip(names, args, strict=True)]
    with torch.inference_mode():
        out = runner(*args)
    count = len(out) if isinstance(out, (tuple, list)) else 1
    outputs = ["output"] if count == 1 else [f"output{i}" for i in range(count)]
    return Predictor("int8-static", path, runner, specs, outputs, meta, threads=threads)


def _eager_predictor(
    path: Path, model: Any, model_args: dict[str, Any] | None, threads: int | None
) -> Predictor:
    from torchkiln.export.models import resolve_model, run_dir_of
    from torchkiln.export.spec import flatten_outputs, input_names_of
    from torchkiln.targets import TargetError, target_kind

    try:  # a pruned artifact (kiln prune / save_pruned) knows the model it re-shapes
        pruned = model is None and target_kind(path) == "pruned"
    except TargetError:
        pruned = False
    if model is None and run_dir_of(path) is None and not pruned:
        raise ExportError(
            f"{path} is a plain weights file: pass model= (zoo name, pkg.mod:fn, file.py:fn, recipe or "
            "nn.Module) so the predictor knows which model to build"
        )
    if pruned:
        module = resolve_model(path)
    else:
        module = resolve_model(path if model is None else model, model_args, weights=path)
    make = getattr(module, "example_inputs", None)
    specs: list[TensorSpec] = []
    outputs: list[str] = []
    if callable(make):
        example = make(2)
        example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
        names = input_names_of(module, len(example))
        specs = [TensorSpec.of(n, t, dynamic_batch=True) for n, t in zip(names, example, strict=True)]
        with torch.no_grad():
            outputs, _ = flatten_outputs(module(*example))
    meta = {"format": "eager", "model": str(model) if model is not None else str(path), "weights": str(path)}
    return Predictor("eager", path, module, specs, outputs, meta, threads=threads)
