"""The before/after table every compression step prints and records.

:func:`compare_models` measures a float model and its compressed version side by side: parameters, the
size of the saved artifact on disk, FLOPs per call, latency (the two timed interleaved in one process,
in the *same* execution mode -- eager vs eager, compiled vs compiled), output agreement on the example
inputs (cosine similarity, SQNR, max error, top-1 agreement of logits) and, given an evaluator, accuracy
on held-out data.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> before = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> after = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
>>> report = compare_models(before, after, torch.randn(8, 16), max_time_s=0.2, min_rounds=3)
>>> report.before["params"], report.after["params"]
(676, 172)
>>> report.after["flops"] < report.before["flops"], report.param_ratio < 0.3
(True, True)
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure.bench import interleaved_compare
from torchkiln.measure.flops import count_flops
from torchkiln.measure.timing import set_threads

__all__ = ["CompressionReport", "artifact_bytes", "compare_models", "output_agreement", "parameter_count"]


class CompareError(KilnError, ValueError):
    """The two models cannot be compared (bad inputs, outputs of different shapes, a failed run)."""


def parameter_count(model: Any) -> int | None:
    """Weights of ``model``: its parameters plus packed quantized weights, else None if it is no module.

    Objects may define ``num_parameters()``. Quantized tensor subclasses count their logical elements;
    the packed weights of eager quantized modules (``weight()``/``bias()`` methods) and the int8 weight
    constants of an exported/converted graph (``get_attr`` tensors of two or more dimensions that are not
    parameters) are counted too, so an int8 model counts what its float original did -- the artifact size
    is what shows the saving.
    """
    counter = getattr(model, "num_parameters", None)
    if callable(counter) and not isinstance(counter, nn.Module):
        try:
            return int(counter())
        except TypeError:  # a method with another signature (e.g. Hugging Face's takes options): count here
            pass
    if not isinstance(model, nn.Module):
        return None
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()

    for p in model.parameters():
        add(p)
    for m in model.modules():
        for attr in ("weight", "bias"):
            fn = getattr(type(m), attr, None)
            if callable(fn) and not isinstance(fn, property):  # eager quantized modules pack their weights
                try:
                    add(getattr(m, attr)())
                except Exception:  # noqa: BLE001 - not a packed-weight accessor after all
                    pass
        if isinstance(m, torch.fx.GraphModule):
            for node in m.graph.nodes:
                if node.op == "get_attr":
                    value = _get_attr(m, str(node.target))
                    if isinstance(value, torch.Tensor) and value.ndim >= 2:
                        add(value)
    return total


def _get_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def artifact_bytes(model: Any, path: str | os.PathLike[str] | None = None) -> int | None:
    """Size on disk of ``path`` when given; otherwise of ``torch.save(model.state_dict())`` in a temp file."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    if not isinstance(model, nn.Module):
        return None
    with tempfile.TemporaryDirectory(prefix="kiln-size-") as tmp:
        target = Path(tmp) / "state_dict.pt"
        try:
            torch.save(model.state_dict(), target)
        except Exception:  # a state_dict that cannot be pickled (some wrapped graphs): no size, not a crash
            return None
        return target.stat().st_size


def _call(fn: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


def _main_tensor(output: Any) -> torch.Tensor:
    """The tensor that stands for a model's output: itself, ``logits``/``last_hidden_state``, or the first."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise CompareError(f"cannot find a tensor in the model output (got {type(output).__name__})")


def output_agreement(reference: Any, candidate: Any) -> dict[str, float]:
    """How closely ``candidate`` outputs match ``reference``: cosine, SQNR (dB), max abs/rel error, top-1.

    >>> x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    >>> agreement = output_agreement(x, x + 0.01)
    >>> round(agreement["cosine"], 4), agreement["top1_agreement"]
    (1.0, 1.0)
    """
    ref = _main_tensor(reference).detach().float()
    cand = _main_tensor(candidate).detach().float()
    if ref.shape != cand.shape:
        raise CompareError(f"outputs differ in shape: before {tuple(ref.shape)}, after {tuple(cand.shape)}")
    diff = (ref - cand).flatten()
    r = ref.flatten()
    noise = float(diff.pow(2).mean())
    signal = float(r.pow(2).mean())
    out = {
        "cosine": float(torch.nn.functional.cosine_similarity(r, cand.flatten(), dim=0)),
        "sqnr_db": math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf,
        "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
        "max_rel_error": float(diff.abs().max() / r.abs().max().clamp_min(1e-12)) if diff.numel() else 0.0,
    }
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        out["top1_agreement"] = float((ref.argmax(-1) == cand.argmax(-1)).float().mean())
    return out


@dataclass
class CompressionReport:
    """Before/after figures of one compression step (``before``/``after`` dicts hold the same keys)."""

    name: str
    technique: str
    mode: str
    threads: int
    batch_size: int | None
    before: dict[str, Any]
    after: dict[str, Any]
    speedup: float | None
    speedup_spread: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def param_ratio(self) -> float | None:
        return _ratio(self.after.get("params"), self.before.get("params"))

    @property
    def size_ratio(self) -> float | None:
        return _ratio(self.after.get("artifact_bytes"), self.before.get("artifact_bytes"))

    @property
    def flops_ratio(self) -> float | None:
        return _ratio(self.after.get("flops"), self.before.get("flops"))

    @property
    def accuracy_drop_pt(self) -> float | None:
        a, b = self.before.get("accuracy"), self.after.get("accuracy")
        return None if a is None or b is None else 100.0 * (a - b)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            param_ratio=self.param_ratio,
            size_ratio=self.size_ratio,
            flops_ratio=self.flops_ratio,
            accuracy_drop_pt=self.accuracy_drop_pt,
        )
        return d

    def history_results(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Results of a ``compress`` history run: bench-shaped ``variants`` (before, after), so the report
        and ``kiln history compare`` read them like a benchmark, plus this whole report and ``extra``."""
        d = self.to_dict()
        variants = [
            {
                "name": label,
                "latency_ms": {"p50": d[label].get("latency_ms"), "iqr": d[label].get("latency_iqr_ms")},
                "size_bytes": d[label].get("artifact_bytes"),
                "accuracy": d[label].get("accuracy"),
                "params": d[label].get("params"),
                "flops": d[label].get("flops"),
                "speedup_vs_baseline": 1.0 if label == "before" else self.speedup,
            }
            for label in ("before", "after")
        ]
        return {"variants": variants, "baseline": "before", "report": d, **(extra or {})}

    def rows(self) -> list[tuple[str, str, str, str]]:
        """``(figure, before, after, change)`` rows, already formatted."""
        b, a = self.before, self.after
        rows = [
            ("parameters", _count(b.get("params")), _count(a.get("params")), _times(self.param_ratio)),
            (
                "artifact size",
                _bytes(b.get("artifact_bytes")),
                _bytes(a.get("artifact_bytes")),
                _times(self.size_ratio),
            ),
            ("FLOPs / call", _count(b.get("flops")), _count(a.get("flops")), _times(self.flops_ratio)),
            (
                f"latency p50 ({self.mode}, {self.threads} thr"
                + (f", batch {self.batch_size})" if self.batch_size else ")"),
                _ms(b.get("latency_ms")),
                _ms(a.get("latency_ms")),
                f"{self.speedup:.2f}x faster" if self.speedup else "-",
            ),
        ]
        if b.get("accuracy") is not None or a.get("accuracy") is not None:
            drop = self.accuracy_drop_pt
            rows.append(
                (
                    "accuracy",
                    _pct(b.get("accuracy")),
                    _pct(a.get("accuracy")),
                    "-" if drop is None else f"{-drop:+.2f} pt",
                )
            )
        if self.agreement:
            ag = self.agreement
            text = f"cosine {ag['cosine']:.4f}, SQNR {ag['sqnr_db']:.1f} dB"
            if "top1_agreement" in ag:
                text += f", top-1 {100 * ag['top1_agreement']:.1f}%"
            rows.append(("output agreement", "reference", text, ""))
        return rows

    def table(self) -> Any:
        """A rich ``Table`` of :meth:`rows`."""
        from rich.table import Table

        table = Table(title=f"{self.name}: {self.technique}", title_justify="left")
        table.add_column("figure")
        for col in ("before", "after", "change"):
            table.add_column(col, justify="right")
        for row in self.rows():
            table.add_row(*row)
        return table

    def render(self) -> str:
        """The table as plain text (for logs and tests)."""
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=110, color_system=None).print(self.table())
        for note in self.notes:
            buffer.write(f"note: {note}\n")
        return buffer.getvalue()


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def _count(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _times(r: float | None) -> str:
    return "-" if r is None else f"x{r:.3f}"


def _flops(model: Any, inputs: Any, notes: list[str], label: str) -> int | None:
    if not isinstance(model, nn.Module):
        return None
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                return count_flops(model, **inputs).total
            if isinstance(inputs, (tuple, list)):
                return count_flops(model, *inputs).total
            return count_flops(model, inputs).total
    except Exception as exc:  # quantized graphs may not run under the counter: say so, do not guess
        notes.append(f"FLOPs of the {label} model not counted ({type(exc).__name__}: {str(exc)[:120]})")
        return None


def _runners(before: Any, after: Any, mode: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """What is timed for each side. ``compile``: both through inductor with freezing (int8 kernels need it;
    a quantized model is set up by :func:`~torchkiln.compress.quantize.run_like`, which compiles a static
    int8 model from its converted graph). ``eager``: as they are."""
    if mode != "compile":
        return before, after
    from torch._dynamo.eval_frame import OptimizedModule

    from torchkiln.compress.quantize import FrozenCompiled, compile_frozen, quant_info, run_like

    if isinstance(before, nn.Module) and quant_info(after):
        return run_like(after, before, "compile")

    def compiled(model: Any) -> Any:
        if isinstance(model, nn.Module) and not isinstance(model, (OptimizedModule, FrozenCompiled)):
            return compile_frozen(model)
        return model

    return compiled(before), compiled(after)


def _batch_size(inputs: Any) -> int | None:
    if isinstance(inputs, Mapping):
        items = list(inputs.values())
    else:
        items = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    for t in items:
        if isinstance(t, torch.Tensor) and t.ndim >= 1:
            return int(t.shape[0])
    return None


def compare_models(
    before: nn.Module | Callable[..., Any],
    after: nn.Module | Callable[..., Any],
    example_inputs: Any,
    *,
    eval_fn: Callable[[Any], float] | None = None,
    artifacts: Mapping[str, str | os.PathLike[str]] | None = None,
    mode: Literal["eager", "compile"] = "eager",
    run_before: Callable[..., Any] | None = None,
    run_after: Callable[..., Any] | None = None,
    threads: int | None = 1,
    max_time_s: float = 5.0,
    min_rounds: int = 10,
    name: str = "model",
    technique: str = "",
    flops: bool = True,
) -> CompressionReport:
    """Measure ``before`` and ``after`` on ``example_inputs`` and return a :class:`CompressionReport`.

    ``example_inputs``: a tensor, a tuple (positional) or a dict (keyword arguments). ``eval_fn(model)``
    returns an accuracy in [0, 1] (called on ``run_before`` / ``run_after``). ``artifacts`` maps
    ``"before"``/``"after"`` to saved files whose size is reported (otherwise the size of each
    ``state_dict`` saved by ``torch.save``). ``mode="compile"`` runs both through ``torch.compile`` with
    inductor freezing (like with like; a quantized model as :func:`~torchkiln.compress.quantize.run_like`
    sets it up); ``run_before``/``run_after`` override what is timed and evaluated, for artifacts
    that run through their own runtime (an ONNX Runtime session, a lowered graph). Latency: the two are
    timed in interleaved rounds in one process with ``threads`` fixed (:func:`interleaved_compare`);
    ``speedup`` is the median per-round ratio ``t_before / t_after``.
    """
    if mode not in ("eager", "compile"):
        raise CompareError(f"mode must be 'eager' or 'compile', got {mode!r}")
    unknown = sorted(set(artifacts or {}) - {"before", "after"})
    if unknown:
        raise CompareError(f"artifacts: unknown key(s) {unknown}; accepted: 'before', 'after'")
    notes: list[str] = []
    artifacts = dict(artifacts or {})
    default_before, default_after = _runners(before, after, mode)
    fn_before = run_before or default_before
    fn_after = run_after or default_after
    was_training = {id(m): m.training for m in (before, after) if isinstance(m, nn.Module)}
    for m in (before, after):
        if isinstance(m, nn.Module):
            m.eval()
    stats: dict[str, dict[str, Any]] = {}
    try:
        with set_threads(threads) as n_threads, torch.inference_mode():
            try:
                out_before = _call(fn_before, example_inputs)
                out_after = _call(fn_after, example_inputs)
            except Exception as exc:
                raise CompareError(f"{name}: running the models on the example inputs failed: {exc}") from exc
            agreement = output_agreement(out_before, out_after)
            comparison = interleaved_compare(
                {
                    "before": lambda: _call(fn_before, example_inputs),
                    "after": lambda: _call(fn_after, example_inputs),
                },
                baseline="before",
                warmup=3,
                min_warmup_s=0.2,
                min_rounds=min_rounds,
                max_time_s=max_time_s,
            )
        for label, model, fn in (("before", before, fn_before), ("after", after, fn_after)):
            stats[label] = {
                "params": parameter_count(model),
                "artifact_bytes": artifact_bytes(model, artifacts.get(label)),
                "flops": _flops(model, example_inputs, notes, label) if flops else None,
                "latency_ms": comparison.timings[label].p50 * 1e3,
                "latency_iqr_ms": comparison.timings[label].iqr * 1e3,
                "accuracy": None,
            }
            if eval_fn is not None:
                stats[label]["accuracy"] = float(eval_fn(fn))
    finally:
        for m in (before, after):
            if isinstance(m, nn.Module) and id(m) in was_training:
                m.train(was_training[id(m)])
    ratio = comparison.ratios["after"]
    if not comparison.converged:
        notes.append(
            f"latency did not settle within {max_time_s:g} s ({comparison.rounds} rounds); "
            "the speedup is the median of the rounds taken"
        )
    return CompressionReport(
        name=name,
        technique=technique,
        mode=mode,
        threads=n_threads,
        batch_size=_batch_size(example_inputs),
        before=stats["before"],
        after=stats["after"],
        speedup=ratio.speedup,
        speedup_spread={"q1": ratio.q1, "q3": ratio.q3, "rounds": ratio.pairs},
        agreement=agreement,
        notes=notes,
    )
