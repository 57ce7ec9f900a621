"""The chosen candidate as an artifact ``kiln serve`` loads (TorchScript, torch.export / AOTInductor
``.pt2``, ONNX, or a static-int8 ``.pt2`` lowered again at load), and ``optimized.toml``, the recipe
fragment that reproduces the choice."""

from __future__ import annotations

import json
import math
import shutil
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchkiln.optimize.candidates import BuildContext, Candidate, build_candidate

if TYPE_CHECKING:
    from torchkiln.optimize.search import OptimizeResult

__all__ = ["short_error", "write_chosen"]


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    loc = f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    return (text[0] if text else type(exc).__name__)[:300] + loc


def write_chosen(result: OptimizeResult, ctx: BuildContext, out: Path, name: str) -> None:
    """Save the chosen candidate (the baseline when nothing won) where ``kiln serve`` can load it, and the
    recipe fragment that reproduces it."""
    import torchkiln.export as export

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
    fmt: str | None = None
    if cand.runtime in ("torchscript", "onnxruntime") or src.suffix == ".onnx":
        target = dest / src.name
        shutil.copy2(src, target)
        for side in (Path(str(src) + ".kiln.json"), Path(str(src) + ".json")):
            if side.is_file():
                shutil.copy2(side, dest / side.name.replace(src.name, target.name))
        fmt = "onnx" if src.suffix == ".onnx" else "torchscript"
    else:
        # eager / compiled torch: an AOTInductor package for compiled candidates, TorchScript otherwise;
        # quantized torch models keep their quantized artifact (load with tk.load_quantized).
        module = built.module
        target = None
        if cand.quant is None:
            from torchkiln.optimize.candidates import Bf16Autocast

            plain = getattr(module, "_orig_mod", module)  # FrozenCompiled -> the module it compiles
            bf16 = cand.precision == "bf16"
            options: dict[str, Any] = {"verbose": False}
            if bf16:  # autocast inside the artifact; BatchNorm folding is checked at fp32 tolerance
                plain = Bf16Autocast(plain)
                options.update(fuse=False, atol=0.1, rtol=0.05)
            if cand.runtime == "compile":
                formats: tuple[str, ...] = ("aoti", "export")
            else:
                formats = ("export",) if bf16 else ("torchscript", "export")
            for f in formats:
                try:
                    name = "model.pt2" if f in ("aoti", "export") else "model.pt"
                    r = export.export(plain, ctx.example, dest / name, format=f, **options)
                    target, fmt = Path(r.path), f
                    break
                except Exception as exc:  # noqa: BLE001 - try the next format, say why
                    notes.append(f"{f} export of {cand.key} failed: {short_error(exc)}")
        if target is None:
            target = dest / src.name
            shutil.copy2(src, target)
            side = Path(str(src) + ".json")
            if side.is_file():
                shutil.copy2(side, dest / (target.name + ".json"))
            fmt = "quantized" if cand.quant else "state_dict"
            if cand.quant == "int8-static" and target.suffix == ".pt2":
                fmt = "int8-static"  # tk.load_predictor / kiln serve lower it to oneDNN int8 again
            elif cand.quant:
                notes.append(
                    f"{target.name} is a torchkiln quantized artifact: load it with tk.load_quantized"
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
