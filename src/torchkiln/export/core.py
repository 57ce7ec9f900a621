"""``export(model, example_inputs, path, format=...)``: write a verified inference artifact.

Formats:

- ``torchscript`` (``.pt``): ``torch.jit.trace`` (or ``script=True``), then ``torch.jit.freeze`` (saved);
  :func:`load_predictor` applies ``torch.jit.optimize_for_inference`` after loading (oneDNN convolutions
  with fused ReLU on CPU), because its graph cannot be serialized (pytorch#69608).
- ``export`` (``.pt2``): ``torch.export.export`` saved with ``torch.export.save``; loaded back with
  ``torch.export.load(...).module()`` (eager kernels, no Python model code needed).
- ``aoti`` (``.pt2``): the ExportedProgram compiled ahead of time by AOTInductor
  (``torch._inductor.aoti_compile_and_package``) into a shared library in a package; needs a C++
  compiler. The generated code is specialized for the thread count at export time.
- ``onnx`` (``.onnx``): the dynamo-based ``torch.onnx.export``, run by ONNX Runtime with all graph
  optimizations.

Every export is checked: the written artifact is loaded back through :func:`load_predictor` and its
outputs compared with the eager model's at the example's batch size, at batch 1 and at a larger odd
batch (the batch dimension is dynamic by default). A mismatch raises :class:`ExportVerificationError`
and nothing is written: the artifact and its sidecar are built in a temp directory beside ``path`` and
renamed into place only after verification passed.

>>> import tempfile, os, torchkiln as tk
>>> model = tk.create_model("resnet-tiny", widths=(8, 16), blocks_per_stage=(1, 1))
>>> out = os.path.join(tempfile.mkdtemp(), "resnet.pt2")
>>> result = tk.export(model, model.example_inputs(2), out, format="export", verbose=False)
>>> result.ok, result.format, [c.batch_size for c in result.checks]
(True, 'export', [2, 1, 5])
>>> len(result.fused)  # BatchNorms folded into their convolutions first
6
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from torchkiln.export.fusion import fuse_with_report
from torchkiln.export.predictor import FORMATS, Predictor, _runner
from torchkiln.export.spec import (
    SIDECAR_VERSION,
    ExportError,
    TensorSpec,
    atomic_directory,
    flatten_outputs,
    input_names_of,
    sidecar_path,
    write_json_atomic,
)
from torchkiln.export.verify import (
    ExportVerificationError,
    OutputCheck,
    compare_outputs,
    sample_inputs,
    verification_batch_sizes,
)

__all__ = ["SUFFIXES", "ExportResult", "aoti_unavailable_reason", "export"]

SUFFIXES = {"torchscript": ".pt", "export": ".pt2", "aoti": ".pt2", "onnx": ".onnx"}
# Above this many parameter bytes ONNX weights go to an external ``<name>.data`` file (protobuf's 2 GB cap).
_ONNX_EXTERNAL_BYTES = 1 << 30


@dataclass
class ExportResult:
    """What :func:`export` wrote and how well it matched eager PyTorch."""

    format: str
    path: Path
    files: list[Path]
    size_bytes: int
    input_specs: list[TensorSpec]
    output_names: list[str]
    checks: list[OutputCheck]
    fused: list[tuple[str, str]] = field(default_factory=list)
    export_s: float = 0.0
    verify_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def max_abs_error(self) -> float | None:
        return max((c.max_abs for c in self.checks), default=None)

    @property
    def max_rel_error(self) -> float | None:
        return max((c.max_rel for c in self.checks), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "size_bytes": self.size_bytes,
            "inputs": [s.to_dict() for s in self.input_specs],
            "outputs": self.output_names,
            "verification": [c.to_dict() for c in self.checks],
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "fused": [list(p) for p in self.fused],
            "export_s": self.export_s,
            "verify_s": self.verify_s,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        lines = [f"{self.format} -> {self.path} ({self.size_bytes / 1e6:.3g} MB)"]
        if self.fused:
            lines.append(f"  folded {len(self.fused)} BatchNorm(s) into the layer before them")
        lines += [f"  {c.describe()}" for c in self.checks]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _FlatOutputs(nn.Module):
    """Calls the model and returns its outputs as a flat tuple of tensors (one tensor when there is one),
    so every format returns the same thing whatever the model returns (dicts, ``ModelOutput``...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> Any:
        leaves = [t for t in pytree.tree_leaves(self.model(*args)) if t is not None]
        return leaves[0] if len(leaves) == 1 else tuple(leaves)


def aoti_unavailable_reason() -> str | None:
    """Why an AOTInductor package cannot be built here (None when it can)."""
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package (needs >= 2.6)"
    try:
        from torch._inductor import config as inductor_config

        candidates = [c for c in inductor_config.cpp.cxx if c]
    except Exception:  # noqa: BLE001 - any failure here means "no configured compiler"
        candidates = []
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else [*candidates, "g++", "clang++", "c++"]
    if not any(shutil.which(c) for c in candidates):
        return (
            f"AOTInductor compiles C++ and no compiler was found (looked for {', '.join(candidates)} on "
            "PATH; set CXX or install g++)"
        )
    return None


def _check_dependencies(fmt: str) -> None:
    if fmt == "onnx":
        missing = []
        for name in ("onnx", "onnxscript", "onnxruntime"):
            try:
                __import__(name)
            except ImportError:
                missing.append(name)
        if missing:
            raise ExportError(
                f"format 'onnx' needs {', '.join(missing)} (the dynamo ONNX exporter and ONNX Runtime): "
                "pip install 'torchkiln[onnx]'"
            )
    elif fmt == "aoti":
        reason = aoti_unavailable_reason()
        if reason:
            raise ExportError(f"format 'aoti' is not available: {reason}")


def _as_inputs(example_inputs: Any, where: str) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        raise ExportError(
            f"{where}: keyword (dict) inputs are not supported; pass the tensors positionally, in the order "
            "of the model's forward"
        )
    inputs = tuple(example_inputs)
    if not inputs:
        raise ExportError(f"{where}: example_inputs is empty; pass at least one tensor")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise ExportError(
                f"{where}: example input {i} is a {type(t).__name__}; exported models take tensors only"
            )
        if t.device.type != "cpu":
            raise ExportError(f"{where}: example input {i} is on {t.device}; export from CPU tensors")
    return inputs


def _resolve_path(path: str | os.PathLike[str], fmt: str) -> Path:
    out = Path(path)
    if out.is_dir() or str(path).endswith(os.sep):
        out = out / f"model{SUFFIXES[fmt]}"
    elif not out.suffix:
        out = out.with_suffix(SUFFIXES[fmt])
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Capture what exporters print (progress lines, optimizer chatter), for an error message if needed."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield buffer
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _dynamic_shapes(inputs: Sequence[torch.Tensor], dynamic_batch: bool) -> Any:
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1)
    return (tuple({0: batch} for _ in inputs),)  # one entry: the wrapper's *args


def _torch_export(wrapper: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> Any:
    try:
        return torch.export.export(
            wrapper, inputs, dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch), strict=False
        )
    except Exception as exc:
        hint = (
            " With a dynamic batch, code that branches on or specializes the batch size cannot be exported; "
            "pass dynamic_batch=False (--static-batch) to fix the batch at the example's."
            if dynamic_batch
            else ""
        )
        raise ExportError(
            f"torch.export could not capture the model: {type(exc).__name__}: {exc}.{hint}"
        ) from exc


def _write_torchscript(
    model: nn.Module,
    wrapper: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    dest: Path,
    script: bool,
    notes: list[str],
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            if script:
                module = torch.jit.script(model)
            else:
                module = torch.jit.trace(wrapper, inputs, strict=False, check_trace=False)
        except Exception as exc:
            how = "torch.jit.script" if script else "torch.jit.trace"
            raise ExportError(f"{how} failed: {type(exc).__name__}: {exc}") from exc
    tracer = {
        str(w.message).split("\n")[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)
    }
    if tracer:
        notes.append(
            f"{len(tracer)} TorchScript tracer warning(s) (values baked in as constants; verification at "
            f"other batch sizes checks they did not matter), e.g.: {sorted(tracer)[0][:160]}"
        )
    # Saved frozen (conv-BN folding, constant propagation); optimize_for_inference's oneDNN graph cannot be
    # serialized (torch.jit.load fails, pytorch#69608), so load_predictor applies it after loading.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\..* is deprecated", category=DeprecationWarning
        )
        torch.jit.save(torch.jit.freeze(module.eval()), str(dest))
    notes.append(
        "TorchScript is deprecated as of torch 2.13 (torch.jit.* warn); export/aoti are its successors"
    )


def _write_onnx(
    wrapper: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    dest: Path,
    *,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
) -> None:
    with _quiet() as log:
        try:
            program = torch.onnx.export(
                wrapper,
                inputs,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch),
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:
            tail = log.getvalue().strip().splitlines()[-5:]
            raise ExportError(
                f"the ONNX exporter failed: {type(exc).__name__}: {str(exc)[:2000]}"
                + ("\nexporter output:\n" + "\n".join(tail) if tail else "")
            ) from exc
        weight_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
        program.save(str(dest), external_data=weight_bytes > _ONNX_EXTERNAL_BYTES)


def _write(
    fmt: str,
    model: nn.Module,
    wrapper: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    dest: Path,
    *,
    dynamic_batch: bool,
    script: bool,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    notes: list[str],
) -> None:
    if fmt == "torchscript":
        _write_torchscript(model, wrapper, inputs, dest, script, notes)
    elif fmt == "onnx":
        _write_onnx(
            wrapper,
            inputs,
            dest,
            dynamic_batch=dynamic_batch,
            input_names=input_names,
            output_names=output_names,
            opset=opset,
        )
    else:
        with _quiet():
            program = _torch_export(wrapper, inputs, dynamic_batch)
        if fmt == "export":
            with warnings.catch_warnings():
                # Said of every weight stored with non-contiguous strides (channels_last convolutions);
                # the weights are saved whole and the verification below loads them back.
                warnings.filterwarnings("ignore", message="No complete tensor found in the group")
                torch.export.save(program, str(dest))
        else:
            from torch._inductor import aoti_compile_and_package

            with _quiet() as log:
                try:
                    aoti_compile_and_package(program, package_path=str(dest))
                except Exception as exc:
                    tail = log.getvalue().strip().splitlines()[-5:]
                    raise ExportError(
                        f"AOTInductor compilation failed: {type(exc).__name__}: {str(exc)[:2000]}"
                        + ("\n" + "\n".join(tail) if tail else "")
                    ) from exc
            notes.append(
                f"AOTInductor code generated for {torch.get_num_threads()} thread(s); load it where the "
                "same thread count is used"
            )


def _eager(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[list[str], list[torch.Tensor]]:
    with torch.no_grad():
        out = model(*inputs)
    return flatten_outputs(out, f"{type(model).__name__}.forward")


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    format: str = "torchscript",  # noqa: A002 - the name users expect
    *,
    dynamic_batch: bool = True,
    fuse: bool = True,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    verify_inputs: Sequence[Any] | None = None,
    script: bool = False,
    opset: int | None = None,
    verbose: bool = True,
) -> ExportResult:
    """Export ``model`` (run on ``example_inputs``, a tensor or tuple of tensors) to ``path`` in ``format``,
    verify it against eager PyTorch, and write ``<path>.kiln.json`` beside it.

    ``path`` may be a directory (``model.<suffix>`` is written there) or a name without a suffix.

    - ``dynamic_batch``: the first dimension of every input is dynamic (one shared size).
    - ``fuse``: fold BatchNorm into the conv/linear before it first (:func:`torchkiln.fuse`).
    - ``verify``: compare with eager at the example batch, batch 1 and a larger odd batch (or on
      ``verify_inputs``, a list of input tuples); ``atol``/``rtol`` override the per-format tolerance
      (:data:`torchkiln.export.verify.TOLERANCES`). With ``verify=False`` the errors are still measured and
      recorded, but a mismatch does not raise.
    - ``script``: TorchScript by ``torch.jit.script`` instead of tracing.
    - ``opset``: ONNX opset (default: the exporter's).
    - ``verbose``: print the verification lines.

    Raises :class:`ExportError` when the model cannot be exported in this format (the reason says why) and
    :class:`ExportVerificationError` when the artifact's outputs differ from eager beyond the tolerance.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; accepted: {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise ExportError(f"export takes a torch.nn.Module, got {type(model).__name__}")
    _check_dependencies(format)
    example = _as_inputs(example_inputs, f"export to {format}")
    if dynamic_batch:
        flat = [i for i, t in enumerate(example) if t.dim() == 0]
        if flat:
            raise ExportError(
                f"export to {format}: input(s) {flat} are scalars with no batch dimension; pass "
                "dynamic_batch=False or give them a leading batch dimension"
            )
        sizes = {t.shape[0] for t in example}
        if len(sizes) > 1:
            raise ExportError(
                f"export to {format}: the inputs' first dimensions differ ({sorted(sizes)}), so there is no "
                "one batch dimension; pass dynamic_batch=False"
            )
    dest = _resolve_path(path, format)
    batch = example[0].shape[0] if example[0].dim() else 1
    overrides = {"atol": atol, "rtol": rtol}

    was_training = model.training
    model.eval()
    try:
        # Reference outputs of the unmodified eager model: the truth every artifact is compared with.
        if verify_inputs is not None:
            cases = [_as_inputs(v, "verify_inputs") for v in verify_inputs]
        elif dynamic_batch:
            cases = [sample_inputs(example, bs) for bs in verification_batch_sizes(batch)]
        else:
            cases = [example]
        output_names, example_out = _eager(model, example)
        references = []
        for case in cases:
            try:
                references.append(_eager(model, case)[1])
            except Exception as exc:
                shapes = ", ".join(str(list(t.shape)) for t in case)
                hint = (
                    "; pass dynamic_batch=False to export it for the example's batch only"
                    if dynamic_batch
                    else ""
                )
                raise ExportError(
                    f"the eager model itself fails on verification inputs of shape {shapes}: "
                    f"{type(exc).__name__}: {exc}{hint}"
                ) from exc
        input_names = input_names_of(model, len(example))
        input_specs = [TensorSpec.of(n, t, dynamic_batch) for n, t in zip(input_names, example, strict=True)]
        output_specs = [
            TensorSpec.of(n, t, dynamic_batch and t.dim() > 0 and t.shape[0] == batch)
            for n, t in zip(output_names, example_out, strict=True)
        ]

        notes: list[str] = []
        start = time.perf_counter()
        prepared, fused = model, []
        if fuse:
            report = fuse_with_report(model, example)
            prepared, fused = report.model, report.folded
        wrapper = _FlatOutputs(prepared).eval()
        # torch.export specializes a dimension of size 1, so a batch-1 example is traced at batch 2.
        trace_inputs = sample_inputs(example, 2) if dynamic_batch and batch == 1 else example

        with atomic_directory(dest) as tmp:
            staged = tmp / dest.name
            _write(
                format,
                prepared,
                wrapper,
                trace_inputs,
                staged,
                dynamic_batch=dynamic_batch,
                script=script,
                input_names=input_names,
                output_names=output_names,
                opset=opset,
                notes=notes,
            )
            export_s = time.perf_counter() - start

            start = time.perf_counter()
            predictor = Predictor(format, staged, _runner(format, staged), input_specs, output_names)
            checks: list[OutputCheck] = []
            for case, expected in zip(cases, references, strict=True):
                got = predictor(*case)
                got = [got] if isinstance(got, torch.Tensor) else list(got)
                checks += compare_outputs(format, output_names, got, expected, case[0].shape[0], overrides)
            verify_s = time.perf_counter() - start
            if verbose:
                print(f"verified {format} against eager:", file=sys.stdout)
                for c in checks:
                    print(f"  {c.describe()}", file=sys.stdout)
            bad = [c for c in checks if not c.ok]
            if bad and verify:
                raise ExportVerificationError(
                    f"{format} export does not match eager PyTorch; nothing was written to {dest}. "
                    + "; ".join(c.describe() for c in bad)
                    + ". Raise atol/rtol only if this error is acceptable for the model",
                    checks,
                )
            staged_files = sorted(p for p in tmp.iterdir() if p.is_file())
            sidecar = {
                "kiln_export": SIDECAR_VERSION,
                "format": format,
                "artifact": dest.name,
                "files": [p.name for p in staged_files],
                "inputs": [s.to_dict() for s in input_specs],
                "outputs": [s.to_dict() for s in output_specs],
                "dynamic_batch": dynamic_batch,
                "example_batch_size": batch,
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "fused": [list(p) for p in fused],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "opset": opset,
                "script": script if format == "torchscript" else None,
                "verification": {
                    "ok": not bad,
                    "enforced": verify,
                    "max_abs_error": max((c.max_abs for c in checks), default=None),
                    "max_rel_error": max((c.max_rel for c in checks), default=None),
                    "checks": [c.to_dict() for c in checks],
                },
                "notes": notes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if format == "onnx":
                import onnxruntime

                sidecar["onnxruntime"] = onnxruntime.__version__
            # Artifact files first, the sidecar last: a sidecar never describes a file that is not there.
            final_files = []
            for p in staged_files:
                os.replace(p, dest.parent / p.name)
                final_files.append(dest.parent / p.name)
            write_json_atomic(sidecar, sidecar_path(dest))
    finally:
        model.train(was_training)
    size = sum(f.stat().st_size for f in final_files)
    return ExportResult(
        format=format,
        path=dest,
        files=final_files,
        size_bytes=size,
        input_specs=input_specs,
        output_names=output_names,
        checks=checks,
        fused=fused,
        export_s=export_s,
        verify_s=verify_s,
        notes=notes,
    )
