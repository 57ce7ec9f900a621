"""Which layers quantization hurts: quantize each selected layer alone and measure the model's output error
(SQNR, cosine) against the float model, and the accuracy it costs when an evaluator is given; then keep
the most sensitive layers in float until an accuracy budget is met.

>>> import torch, torchkiln as tk
>>> from torchkiln.compress.quantize import Int8Dynamic
>>> torch.manual_seed(0) and None
>>> model = tk.create_model("mlp", hidden=(32, 32))
>>> report = sensitivity(model, Int8Dynamic(backend="eager"), [model.example_inputs(16)])
>>> sorted(report.ranking()) == ["body.0.0", "body.1.0"]
True
>>> all(row.sqnr_db > 20 for row in report.layers)
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchkiln.compress.quantize import Int8Static, QuantizeError, model_inputs, select_layers

__all__ = ["LayerSensitivity", "SensitivityReport", "keep_sensitive_in_float", "sensitivity"]


@dataclass
class LayerSensitivity:
    """One layer quantized alone: output SQNR (dB) and cosine vs float, and accuracy when evaluated."""

    layer: str
    sqnr_db: float
    cosine: float
    accuracy: float | None = None
    accuracy_drop_pt: float | None = None


@dataclass
class SensitivityReport:
    """Per-layer sensitivity, most sensitive first (largest accuracy drop, else lowest SQNR)."""

    technique: str
    layers: list[LayerSensitivity]
    float_accuracy: float | None = None
    all_quantized: LayerSensitivity | None = None
    notes: list[str] = field(default_factory=list)

    def ranking(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [row.layer for row in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> Any:
        """A rich ``Table`` of the layers."""
        from rich.table import Table

        table = Table(
            title=f"sensitivity: {self.technique} (one layer quantized at a time)", title_justify="left"
        )
        for col in ("layer", "SQNR dB", "cosine", "accuracy", "drop pt"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        rows = list(self.layers) + ([self.all_quantized] if self.all_quantized else [])
        for row in rows:
            table.add_row(
                row.layer,
                f"{row.sqnr_db:.1f}",
                f"{row.cosine:.5f}",
                "-" if row.accuracy is None else f"{100 * row.accuracy:.2f}%",
                "-" if row.accuracy_drop_pt is None else f"{row.accuracy_drop_pt:+.2f}",
            )
        return table


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _main(out: Any) -> torch.Tensor:
    from torchkiln.compress.compare import _main_tensor

    return _main_tensor(out).detach().float()


def _batches(data: Any, limit: int) -> list[Any]:
    if isinstance(data, torch.Tensor):
        return [(data,)]
    out = []
    for batch in data:
        out.append((batch,) if isinstance(batch, torch.Tensor) else model_inputs(batch))
        if len(out) >= limit:
            break
    if not out:
        raise QuantizeError("sensitivity: the data yielded no batch")
    return out


@torch.no_grad()
def _outputs(model: Any, batches: list[Any]) -> list[torch.Tensor]:
    return [_main(_call(model, b)) for b in batches]


def _error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> tuple[float, float]:
    signal = noise = dot = ref_sq = out_sq = 0.0
    for r, o in zip(ref, out, strict=True):
        r, o = r.flatten(), o.flatten()
        signal += float(r.pow(2).sum())
        noise += float((r - o).pow(2).sum())
        dot += float((r * o).sum())
        ref_sq += float(r.pow(2).sum())
        out_sq += float(o.pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    cosine = dot / math.sqrt(max(ref_sq * out_sq, 1e-30))
    return sqnr, cosine


def _analysis_config(config: Any) -> Any:
    # Static int8 is analysed on the reference graph: the same int8 numerics, no oneDNN lowering per layer.
    return dataclasses.replace(config, lower="reference") if isinstance(config, Int8Static) else config


def _literal(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _only(config: Any, layer: str) -> Any:
    pattern = _literal(layer)
    return dataclasses.replace(config, include=(pattern,), exclude=(), keep_first_last=False, filter_fn=None)


def sensitivity(
    model: nn.Module,
    config: Any,
    data: Any,
    *,
    eval_fn: Callable[[Any], float] | None = None,
    batches: int = 4,
    layers: Iterable[str] | None = None,
    **quantize_kwargs: Any,
) -> SensitivityReport:
    """Quantize each layer ``config`` selects (or ``layers``) alone and measure what it costs.

    ``data``: batches to measure output error on (a DataLoader, a list of input tuples, a tensor; the
    first ``batches`` are used). ``eval_fn(model) -> accuracy in [0, 1]`` adds the accuracy of each
    single-layer model. Extra keyword arguments go to ``tk.quantize`` (``example_inputs=``...).
    """
    from torchkiln.compress.api import quantize

    model.eval()
    work = _batches(data, batches)
    config = _analysis_config(config)
    names = list(layers) if layers is not None else select_layers(model, config)
    if not names:
        raise QuantizeError(
            f"sensitivity: {type(config).__name__} selects no layer of {type(model).__name__}"
        )
    reference = _outputs(model, work)
    float_acc = float(eval_fn(model)) if eval_fn is not None else None

    def measure(label: str, q: Any) -> LayerSensitivity:
        sqnr, cosine = _error(reference, _outputs(q, work))
        acc = float(eval_fn(q)) if eval_fn is not None else None
        drop = None if acc is None or float_acc is None else 100.0 * (float_acc - acc)
        return LayerSensitivity(label, sqnr, cosine, acc, drop)

    rows = [measure(name, quantize(model, _only(config, name), **quantize_kwargs)) for name in names]
    rows.sort(key=lambda r: (-(r.accuracy_drop_pt or 0.0) if eval_fn else 0.0, r.sqnr_db))
    everything = measure("(all selected layers)", quantize(model, config, **quantize_kwargs))
    return SensitivityReport(
        technique=type(config).__name__, layers=rows, float_accuracy=float_acc, all_quantized=everything
    )


def keep_sensitive_in_float(
    model: nn.Module,
    config: Any,
    data: Any,
    eval_fn: Callable[[Any], float],
    *,
    budget_pt: float = 1.0,
    report: SensitivityReport | None = None,
    **quantize_kwargs: Any,
) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Keep the most sensitive layers in float, one at a time, until the accuracy drop of the quantized
    model is within ``budget_pt`` percentage points. Returns ``(config, quantized_model, steps)`` where
    ``config`` has those layers added to ``exclude`` and ``steps`` lists each try's float layers and drop.
    Raises :class:`QuantizeError` when even quantizing a single layer misses the budget."""
    from torchkiln.compress.api import quantize

    report = report or sensitivity(model, config, data, eval_fn=eval_fn, **quantize_kwargs)
    float_acc = report.float_accuracy if report.float_accuracy is not None else float(eval_fn(model))
    order = report.ranking()
    steps: list[dict[str, Any]] = []
    for k in range(len(order)):
        kept = order[:k]
        escaped = tuple(_literal(n) for n in kept)
        trial = dataclasses.replace(config, exclude=tuple(config.exclude) + escaped)
        q = quantize(model, trial, **quantize_kwargs)
        drop = 100.0 * (float_acc - float(eval_fn(q)))
        steps.append({"float_layers": kept, "accuracy_drop_pt": drop})
        if drop <= budget_pt:
            return trial, q, steps
    raise QuantizeError(
        f"keep_sensitive_in_float: no choice of float layers meets the {budget_pt} pt budget "
        f"(best drop {min(s['accuracy_drop_pt'] for s in steps):.2f} pt with one layer quantized)"
    )
