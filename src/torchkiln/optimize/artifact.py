"""The chosen candidate as an artifact ``kiln serve`` loads, and ``optimized.toml``, the recipe fragment
that reproduces the choice.

The artifact runs the way the candidate was measured: a compiled candidate becomes an AOTInductor
package (torch.export ``.pt2`` where AOTInductor cannot build it), an eager one frozen TorchScript
(torch.export where tracing fails); bf16 candidates carry their autocast and channels_last candidates
their memory format (weights in channels_last, the input converted inside the artifact). Dynamic int8
keeps its int8 kernels: the eager ``quantize_dynamic`` model as frozen TorchScript
(``quantized::linear_dynamic``), the torchao model as an AOTInductor package (its ``aten._int_mm``
matmuls compiled as under ``torch.compile``). TorchScript / ONNX Runtime candidates keep the file they
were measured with; static int8 keeps its PT2E ``.pt2`` (lowered to oneDNN int8 again at load). Where a
path fails the next one is tried and ``notes`` say why and what kernels the saved artifact runs.
"""

from __future__ import annotations

import json
import math
import shutil
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkiln.optimize.candidates import Bf16Autocast, BuildContext, Built, Candidate, build_candidate

if TYPE_CHECKING:
    from torchkiln.optimize.search import OptimizeResult

__all__ = ["ChannelsLastInput", "short_error", "write_chosen"]

# Dynamic int8 compiled by AOTInductor against the eager torchao model: the per-row activation scales are
# computed by generated code, which can round an activation to the neighbouring int8 step (an output
# error of about one activation step times the weights, ~1e-3 on unit-scale outputs). A wrong graph
# still fails by orders of magnitude.
_INT8_COMPILED_TOLERANCE = {"atol": 1e-2, "rtol": 1e-2}


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    loc = f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    return (text[0] if text else type(exc).__name__)[:300] + loc


class ChannelsLastInput(nn.Module):
    """``module`` (its weights already in channels_last) called with every 4-d input converted to
    channels_last: how a channels_last candidate is exported, so the artifact runs in the memory format
    it was measured in whatever layout its callers send.

    >>> conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    >>> out = ChannelsLastInput(conv)(torch.rand(2, 3, 8, 8))
    >>> out.is_contiguous(memory_format=torch.channels_last)
    True
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return self.module(
            *(
                a.contiguous(memory_format=torch.channels_last)
                if isinstance(a, torch.Tensor) and a.dim() == 4
                else a
                for a in args
            )
        )


def write_chosen(result: OptimizeResult, ctx: BuildContext, out: Path, name: str) -> None:
    """Save the chosen candidate (the baseline when nothing won) under ``out/chosen`` where ``kiln serve``
    can load it, set ``result.artifact`` / ``result.artifact_format``, and write ``out/optimized.toml``.
    ``name`` is the model's name (unused in the files; kept for the caller's signature)."""
    chosen = result.chosen or result.baseline
    cand = Candidate(**chosen.candidate)
    dest = out / "chosen"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    notes = result.notes
    try:
        built = build_candidate(cand, ctx)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"could not rebuild {cand.key} to save it: {short_error(exc)}")
        return
    src = built.artifact
    target: Path | None = None
    fmt: str | None = None
    if cand.runtime in ("torchscript", "onnxruntime") or src.suffix == ".onnx":
        target, fmt = _copy_artifact(src, dest), ("onnx" if src.suffix == ".onnx" else "torchscript")
    elif cand.quant in ("int8-dynamic", "int8-weight-only"):
        target, fmt = _export_int8_dynamic(cand, built, ctx.example, dest, notes)
    elif cand.quant is None:
        target, fmt = _export_float(cand, built, ctx.example, dest, notes)
    if target is None:
        target = _copy_artifact(src, dest)
        fmt = "quantized" if cand.quant else "state_dict"
        if cand.quant == "int8-static" and target.suffix == ".pt2":
            fmt = "int8-static"  # tk.load_predictor / kiln serve lower it to oneDNN int8 again
        elif cand.quant:
            notes.append(
                f"{target.name} is a torchkiln quantized state dict that kiln serve cannot load: load it "
                "with tk.load_quantized(path, model=<the float model>, config=<its quantize config>)"
            )
        else:
            notes.append(
                f"{target.name} is the model's state dict: serve it with kiln serve --model <its model>"
            )
    result.artifact, result.artifact_format = target, fmt
    fragment = {
        "optimize": {
            "chosen": cand.key,
            "objective": result.objective,
            "accuracy_budget": result.accuracy_budget,
            "batch_size": result.batch_size,
            "threads": result.threads,
            "candidate": cand.to_dict(),
            "artifact": str(target),
            "format": fmt,
        }
    }
    path = out / "optimized.toml"
    path.write_text(_toml(fragment))
    result.recipe_fragment = path


def _copy_artifact(src: Path, dest: Path) -> Path:
    """``src`` and its sidecars (``.kiln.json`` of an export, ``.json`` of a quantized artifact) copied
    into ``dest``."""
    target = dest / src.name
    shutil.copy2(src, target)
    for side in (Path(str(src) + ".kiln.json"), Path(str(src) + ".json")):
        if side.is_file():
            shutil.copy2(side, dest / side.name)
    return target


def _export_first(
    module: nn.Module,
    example: torch.Tensor,
    dest: Path,
    formats: Sequence[str],
    key: str,
    notes: list[str],
    options: Mapping[str, Mapping[str, Any]],
) -> tuple[Path | None, str | None]:
    """Export ``module`` in the first of ``formats`` that works (each verified against ``module``);
    a format that fails adds a note saying why. ``options[fmt]``: extra ``export`` arguments."""
    import torchkiln.export as export

    for f in formats:
        filename = "model.pt2" if f in ("aoti", "export") else "model.pt"
        try:
            r = export.export(module, example, dest / filename, format=f, verbose=False, **options.get(f, {}))
        except Exception as exc:  # noqa: BLE001 - try the next format, say why
            notes.append(f"{f} export of {key} failed: {short_error(exc)}")
            continue
        return Path(r.path), f
    return None, None


def _annotate(path: Path, key: str, note: str, notes: list[str]) -> None:
    """Record the candidate and what its artifact runs in the sidecar (``predictor.metadata``) and notes."""
    from torchkiln.export.spec import read_sidecar, sidecar_path, write_json_atomic

    notes.append(note)
    meta = read_sidecar(path)
    if meta is None:
        return
    meta["candidate"] = key
    meta["notes"] = [*meta.get("notes", []), note]
    write_json_atomic(meta, sidecar_path(path))


def _export_float(
    cand: Candidate, built: Built, example: torch.Tensor, dest: Path, notes: list[str]
) -> tuple[Path | None, str | None]:
    """An eager / compiled float candidate: an AOTInductor package for compiled candidates (torch.export
    where that fails), TorchScript otherwise (torch.export where tracing fails), with the candidate's
    autocast and memory format inside."""
    module = getattr(built.module, "_orig_mod", built.module)  # FrozenCompiled -> the module it compiles
    bf16 = cand.precision == "bf16"
    options: dict[str, Any] = {}
    if bf16:  # autocast inside the artifact; BatchNorm folding is checked at fp32 tolerance
        module = Bf16Autocast(module)
        options.update(fuse=False, atol=0.1, rtol=0.05)
    if cand.channels_last:  # the built module is already channels_last; the input is converted inside
        module = ChannelsLastInput(module)
    if cand.runtime == "compile":
        formats: tuple[str, ...] = ("aoti", "export")
    else:
        formats = ("export",) if bf16 else ("torchscript", "export")
    target, fmt = _export_first(
        module, example, dest, formats, cand.key, notes, dict.fromkeys(formats, options)
    )
    if target is not None and cand.channels_last:
        _annotate(
            target,
            cand.key,
            f"{cand.key} saved as {fmt}: convolution weights in channels_last and the input converted to "
            "channels_last inside the artifact, as measured",
            notes,
        )
    return target, fmt


def _export_int8_dynamic(
    cand: Candidate, built: Built, example: torch.Tensor, dest: Path, notes: list[str]
) -> tuple[Path | None, str | None]:
    """A dynamic int8 torch candidate with its int8 kernels: the eager ``quantize_dynamic`` model as frozen
    TorchScript (``quantized::linear_dynamic`` serializes there; torch.export cannot capture its packed
    weights), the torchao model as an AOTInductor package, else as a torch.export program."""
    from torchkiln.compress.quantize import quant_info

    q = built.module
    backend = quant_info(q).get("backend")
    base = {"fuse": False}  # the quantized layers hold no BatchNorm to fold, and must stay as they are
    if backend == "eager":
        target, fmt = _export_first(
            q, example, dest, ("torchscript",), cand.key, notes, {"torchscript": base}
        )
        if target is not None:
            engine = torch.backends.quantized.engine
            _annotate(
                target,
                cand.key,
                f"{cand.key} saved as frozen TorchScript: its int8 Linear layers run "
                f"quantized::linear_dynamic ({engine} engine), as measured; its activation scale is "
                "computed over each input tensor, so under kiln serve a request's outputs move by int8 "
                "rounding with the requests it is batched with",
                notes,
            )
        return target, fmt
    if backend != "torchao":
        notes.append(f"{cand.key}: a dynamic int8 model of backend {backend!r} has no torch export path")
        return None, None
    kernels = (
        "its int8 weights dequantized inside each Linear's matmul"
        if cand.quant == "int8-weight-only"
        else "its int8 Linear layers' activation quantization and aten._int_mm"
    )
    options = {"aoti": {**base, **_INT8_COMPILED_TOLERANCE}, "export": base}
    target, fmt = _export_first(q, example, dest, ("aoti", "export"), cand.key, notes, options)
    if fmt == "aoti":
        _annotate(
            target,
            cand.key,
            f"{cand.key} saved as an AOTInductor package: {kernels} compiled into generated code, as under "
            "torch.compile when measured",
            notes,
        )
    elif fmt == "export":
        _annotate(
            target,
            cand.key,
            f"{cand.key} saved as a torch.export program (AOTInductor could not build it): {kernels} run "
            "eagerly, unfused -- not the compiled code that was measured, so expect it slower than measured "
            "(loading needs torchao)",
            notes,
        )
    return target, fmt


def _toml(data: Mapping[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((f"{prefix}{k}", v))
        elif v is None:
            continue
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
            lines.append(f"{k} = {v}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        text += f"\n[{name}]\n" + _toml(table, f"{name}.")
    return text
