"""``kiln optimize RECIPE``: the recipe's model (trained weights given, or trained here first) and data
turned into :func:`~torchkiln.optimize.optimize`'s inputs: an example batch, an evaluator (accuracy on the
validation split, or agreement with the float model's outputs where there are no labels) and the
training data for calibration and the pruning fine-tune."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from torchkiln.optimize.pareto import OptimizeError
from torchkiln.optimize.search import (
    Evaluator,
    OptimizeResult,
    accuracy_evaluator,
    agreement_evaluator,
    optimize,
)

__all__ = ["evaluator_for", "optimize_recipe", "parse_budget", "parse_duration"]


def parse_budget(text: str | float) -> float:
    """An accuracy budget as an absolute fraction: ``"1%"`` / ``"1pt"`` -> 0.01, ``"0.005"`` -> 0.005.

    >>> parse_budget("1%"), parse_budget("0.5pt"), parse_budget("0.02")
    (0.01, 0.005, 0.02)
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|pt|pts|points?)?\s*", str(text))
        if not m:
            raise OptimizeError(
                f"accuracy budget {text!r} is not understood; give a percentage ('1%'), points ('1pt') "
                "or a fraction below 1 ('0.01')"
            )
        value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not 0 <= value < 1:
        raise OptimizeError(f"accuracy budget {text!r} is {value:g} as a fraction; it must be in [0, 1)")
    return value


def parse_duration(text: str | float | None) -> float | None:
    """Seconds from ``"20m"``, ``"90s"``, ``"1h"``, ``"1h30m"`` or a plain number of seconds.

    >>> parse_duration("20m"), parse_duration("1h30m"), parse_duration("45"), parse_duration(None)
    (1200.0, 5400.0, 45.0, None)
    """
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    parts = re.findall(r"([0-9]*\.?[0-9]+)\s*([hms]?)", str(text).strip())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", str(text)):
        raise OptimizeError(
            f"time budget {text!r} is not understood; give e.g. '20m', '90s', '1h30m' or seconds"
        )
    return float(sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts))


def _stack(data: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = len(data) if limit is None else min(limit, len(data))
    items = [data[i] for i in range(n)]
    first = items[0]
    if isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], torch.Tensor):
        xs = torch.stack([it[0] for it in items])
        ys = torch.stack([torch.as_tensor(it[1]) for it in items])
        return xs, ys if not ys.is_floating_point() else None
    if isinstance(first, torch.Tensor):
        return torch.stack(items), None
    raise OptimizeError(
        "optimize needs dataset items that are an input tensor or an (input, label) pair; "
        f"got {type(first).__name__}"
    )


def evaluator_for(
    model: torch.nn.Module, val: Any, batch_size: int, limit: int | None = 2048
) -> tuple[Evaluator, torch.Tensor, str]:
    """``(evaluator, inputs, description)``: accuracy where ``val`` has integer labels, else agreement with
    ``model``'s own outputs. ``limit`` caps the samples evaluated."""
    xs, ys = _stack(val, limit)
    if ys is not None:
        return accuracy_evaluator(xs, ys, batch_size), xs, f"accuracy on {len(xs)} validation samples"
    return agreement_evaluator(model, xs, batch_size), xs, f"output agreement on {len(xs)} samples"


def optimize_recipe(
    recipe: str | Path,
    *,
    overrides: list[str] | None = None,
    weights: str | Path | None = None,
    out_dir: str | Path | None = None,
    history: Any = None,
    **kwargs: Any,
) -> tuple[OptimizeResult, str]:
    """Optimize a recipe's model for inference; returns ``(result, what the evaluator measures)``.

    ``recipe``: a recipe ``.toml``, a ``kiln train`` run (its directory, or its ``model.pt`` beside
    ``recipe.json``: the trained weights and the recipe's data) or a pruned artifact that carries its
    recipe. A recipe without ``weights`` (a ``model.pt`` state dict or training checkpoint) is trained
    first (``kiln train`` into ``<out_dir>/train``): optimizing random weights would measure nothing useful.
    """
    from torchkiln.targets import resolve_target
    from torchkiln.train.from_recipe import train_recipe

    target = resolve_target(
        str(recipe),
        weights=weights,
        overrides=list(overrides or []),
        accept=("recipe", "run", "pruned"),
        command="kiln optimize",
    )
    if target.train_data is None:
        raise OptimizeError(
            f"{recipe}: optimize needs the model's data (calibration, fine-tuning and the accuracy check); "
            "this pruned artifact carries no recipe: give the recipe (.toml) or the training run instead"
        )
    rec = target.recipe
    name = target.name or Path(recipe).stem
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{name}-optimize"
    model, train, val = target.model, target.train_data, target.val_data
    if target.kind == "recipe" and weights is None:
        fit = train_recipe(rec, out_dir=out / "train", record=history is not None)
        model = fit.model
    model = model.cpu().eval()
    batch_size = int(kwargs.pop("batch_size", 32))
    evaluator, xs, what = evaluator_for(model, val if val is not None else train, batch_size)
    result = optimize(
        model,
        xs[:batch_size],
        evaluator,
        batch_size=batch_size,
        train_data=train,
        history=history,
        out_dir=out,
        name=name,
        **kwargs,
    )
    return result, what
