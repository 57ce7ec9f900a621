"""The HTML report: one self-contained file (inline CSS, inline SVG charts, no scripts, no network)
that shows which variant won and by how much, then the evidence: the variants table, Pareto chart,
throughput sweeps, training curves, top operators, memory timelines and the environment.

Runs are read in the shapes of ``report/schema.py``; every key may be missing, and a section only
appears when some run has data for it. Everything user-provided is escaped (Jinja2 autoescape), and
a Content-Security-Policy forbids the page from loading anything.

>>> import os, tempfile
>>> from torchkiln.report.history import Run
>>> run = Run("bench-1", "bench", "mlp", "2025-01-01T00:00:00+00:00", results={
...     "baseline": "fp32", "batch_size": 8, "threads": 1, "variants": [
...         {"name": "fp32", "latency_ms": {"p50": 2.0}, "speedup_vs_baseline": 1.0},
...         {"name": "bf16", "latency_ms": {"p50": 1.0}, "speedup_vs_baseline": 2.0}]})
>>> path = render_report([run], os.path.join(tempfile.mkdtemp(), "report.html"))
>>> headline(run)["text"]
'bf16 is 2.0× faster than fp32 (p50 1.00 ms vs 2.00 ms, batch 8, 1 thread)'
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from torchkiln.report import charts
from torchkiln.report.history import History, Run

__all__ = ["build_context", "headline", "render_report", "report_for"]

TEMPLATES = Path(__file__).parent / "templates"
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'none'; "
    "base-uri 'none'; form-action 'none'"
)
TOP_OPS_ROWS = 20
MODULE_ROWS = 15
ACTIVATION_ROWS = 15
VAL_ROWS = 20


# ---------------------------------------------------------------------------------------------- formatting


def num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, non-numeric, bool, NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt_ms(value: Any, unit: bool = True) -> str:
    """Milliseconds with about three significant digits: ``0.123 ms``, ``12.3 ms``, ``1,234 ms``."""
    v = num(value)
    if v is None:
        return "—"
    if abs(v) < 1:
        text = f"{v:.3f}"
    elif abs(v) < 10:
        text = f"{v:.2f}"
    elif abs(v) < 100:
        text = f"{v:.1f}"
    else:
        text = f"{v:,.0f}"
    return f"{text} ms" if unit else text


def fmt_seconds(value: Any) -> str:
    v = num(value)
    if v is None:
        return "—"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def fmt_bytes(value: Any) -> str:
    """Binary units: ``512 B``, ``1.5 KiB``, ``4.21 MiB``."""
    v = num(value)
    if v is None:
        return "—"
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if abs(v) >= 1024**power:
            scaled = v / 1024**power
            return f"{scaled:.3g} {unit}" if abs(scaled) < 1000 else f"{scaled:,.0f} {unit}"
    return f"{v:.0f} B"


def fmt_rate(value: Any) -> str:
    """Per-second rates with thousands separators (``26,000``) or decimals when small (``12.5``)."""
    v = num(value)
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_flops(value: Any) -> str:
    v = num(value)
    if v is None:
        return "—"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}FLOP"
    return f"{v:.3g} FLOP"


def fmt_ratio(value: Any) -> str:
    """A speedup: ``3.4×`` from 1.1 up, ``1.04×`` below (so small wins do not read as 1.0×)."""
    v = num(value)
    if v is None:
        return "—"
    return f"{v:.1f}×" if v >= 1.095 else f"{v:.2f}×"


def fmt_pct(value: Any, digits: int = 1) -> str:
    v = num(value)
    return "—" if v is None else f"{v * 100:.{digits}f}%"


def fmt_created(value: Any) -> str:
    """An ISO timestamp as ``2025-01-31 14:05 UTC`` (anything else unchanged)."""
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if when.tzinfo is not None:
        return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return when.strftime("%Y-%m-%d %H:%M")


def fmt_number(value: Any) -> str:
    v = num(value)
    if v is None:
        return "—" if value is None else str(value)
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _is_fraction_metric(values: Sequence[Any]) -> bool:
    nums = [v for v in (num(x) for x in values) if v is not None]
    return bool(nums) and all(0.0 <= v <= 1.0 for v in nums)


def fmt_accuracy(value: Any, as_percent: bool) -> str:
    v = num(value)
    if v is None:
        return "—"
    return f"{v * 100:.2f}%" if as_percent else f"{v:.4g}"


# ---------------------------------------------------------------------------------------------- variants


def _p(variant: dict[str, Any], key: str) -> float | None:
    latency = variant.get("latency_ms")
    return num(latency.get(key)) if isinstance(latency, dict) else None


def _variants(run: Run) -> list[dict[str, Any]]:
    variants = run.results.get("variants") if isinstance(run.results, dict) else None
    if not isinstance(variants, list):
        return []
    return [v for v in variants if isinstance(v, dict)]


def _baseline_index(run: Run, variants: list[dict[str, Any]]) -> int:
    name = run.results.get("baseline")
    for i, v in enumerate(variants):
        if name is not None and str(v.get("name")) == str(name):
            return i
    for i, v in enumerate(variants):
        if num(v.get("speedup_vs_baseline")) == 1.0:
            return i
    return 0


def _speedup(variant: dict[str, Any], base: dict[str, Any]) -> float | None:
    """The recorded paired speedup, else the ratio of p50 latencies."""
    recorded = num(variant.get("speedup_vs_baseline"))
    if recorded is not None and recorded > 0:
        return recorded
    if variant is base:
        return 1.0
    b, v = _p(base, "p50"), _p(variant, "p50")
    return b / v if b and v else None


def _analyse(run: Run) -> dict[str, Any] | None:
    """Baseline, per-variant speedups and the winner (the fastest variant that beats the baseline)."""
    variants = _variants(run)
    if not variants:
        return None
    bi = _baseline_index(run, variants)
    base = variants[bi]
    speedups = [_speedup(v, base) for v in variants]
    candidates = [(s, i) for i, s in enumerate(speedups) if i != bi and s is not None]
    best = max(candidates, default=None)
    winner = best[1] if best is not None and best[0] > 1.0 else None
    if "chosen" in run.results:  # an optimize run: the winner is what was chosen under the budget
        names = [v.get("name") for v in variants]
        chosen = run.results.get("chosen")
        winner = names.index(chosen) if chosen in names else None
        if winner is not None and speedups[winner] is not None:
            best = (speedups[winner], winner)  # the headline names the choice, not the fastest
    return {"variants": variants, "baseline": bi, "speedups": speedups, "best": best, "winner": winner}


def _threads(run: Run) -> int | None:
    threads = num(run.results.get("threads"))
    if threads is None:
        cpu = run.env.get("cpu") if isinstance(run.env, dict) else None
        threads = num(cpu.get("torch_threads")) if isinstance(cpu, dict) else None
    return int(threads) if threads is not None else None


def _conditions(run: Run) -> str:
    parts = []
    batch = num(run.results.get("batch_size"))
    if batch is not None:
        parts.append(f"batch {int(batch)}")
    threads = _threads(run)
    if threads is not None:
        parts.append(f"{threads} thread" + ("" if threads == 1 else "s"))
    device = run.results.get("device")
    if isinstance(device, str) and device and device != "cpu":
        parts.append(device)
    return ", ".join(parts)


def _accuracy_delta(variant: dict[str, Any], base: dict[str, Any], as_percent: bool) -> dict[str, Any] | None:
    a, b = num(variant.get("accuracy")), num(base.get("accuracy"))
    if a is None or b is None:
        return None
    delta = a - b
    if as_percent:
        text = f"accuracy {delta * 100:+.2f} pts ({a * 100:.2f}% vs {b * 100:.2f}%)"
    else:
        text = f"accuracy {delta:+.4g} ({a:.4g} vs {b:.4g})"
    text = text.replace("+0.00 pts", "±0.00 pts").replace("-0.00 pts", "±0.00 pts")
    return {"text": text, "good": delta >= 0, "delta": delta}


def _size_ratio(variant: dict[str, Any], base: dict[str, Any]) -> dict[str, Any] | None:
    a, b = num(variant.get("size_bytes")), num(base.get("size_bytes"))
    if not a or not b:
        return None
    ratio = b / a
    if abs(ratio - 1) < 0.005:
        text = f"same size ({fmt_bytes(a)})"
    elif ratio > 1:
        text = f"{fmt_ratio(ratio)} smaller ({fmt_bytes(a)} vs {fmt_bytes(b)})"
    else:
        text = f"{fmt_ratio(1 / ratio)} larger ({fmt_bytes(a)} vs {fmt_bytes(b)})"
    return {"text": text, "good": ratio >= 1, "ratio": ratio}


def headline(run: Run) -> dict[str, Any] | None:
    """The sentence at the top of the report for a run with ``variants`` (None without variants).

    Keys: ``text`` (the plain sentence), ``won`` (bool), ``winner``, ``baseline``, ``speedup``,
    ``winner_p50``/``baseline_p50``, ``conditions``, ``accuracy``/``size`` (dicts with ``text`` and
    ``good``, or None), ``noise`` (set when the win is inside the measured spread) and ``caveat`` (set
    when the benchmark did not converge).
    """
    info = _analyse(run)
    if info is None:
        return None
    variants, bi = info["variants"], info["baseline"]
    base = variants[bi]
    as_percent = _is_fraction_metric([v.get("accuracy") for v in variants])
    base_name = str(base.get("name", f"variant {bi}"))
    conditions = _conditions(run)
    out: dict[str, Any] = {
        "baseline": base_name,
        "baseline_p50": _p(base, "p50"),
        "conditions": conditions,
        "accuracy": None,
        "size": None,
        "noise": None,
        "caveat": None,
        "winner": None,
        "speedup": None,
        "winner_p50": None,
    }
    if len(variants) < 2:
        out["won"] = False
        out["text"] = f"Only one variant measured ({base_name}): nothing to compare against."
        return out
    best = info["best"]
    if best is None:
        out["won"] = False
        out["text"] = f"No variant has a latency that can be compared with {base_name}."
        return out
    speedup, index = best
    variant = variants[index]
    name = str(variant.get("name", f"variant {index}"))
    p50s = f"p50 {fmt_ms(_p(variant, 'p50'))} vs {fmt_ms(_p(base, 'p50'))}"
    detail = f"{p50s}, {conditions}" if conditions else p50s
    out.update(
        winner=name,
        speedup=speedup,
        winner_p50=_p(variant, "p50"),
        accuracy=_accuracy_delta(variant, base, as_percent),
        size=_size_ratio(variant, base),
    )
    if info["winner"] is not None:
        out["won"] = True
        out["text"] = f"{name} is {fmt_ratio(speedup)} faster than {base_name} ({detail})"
        # Inside the noise when the lower quartile of the per-round ratios is not above 1 (the variant
        # was not faster in at least three rounds out of four); without quartiles, median - IQR/2.
        iqr, q1 = num(variant.get("speedup_iqr")), num(variant.get("speedup_q1"))
        if q1 is None and iqr is not None:
            q1 = speedup - iqr / 2
        if q1 is not None and q1 <= 1.0:
            spread = f"speedup IQR {iqr:.2f}" if iqr is not None else f"lower quartile {q1:.2f}×"
            out["noise"] = (
                f"The win is within the measured spread ({spread}); treat it as a tie unless a longer "
                "benchmark confirms it."
            )
    else:
        out["won"] = False
        slower = 1 / speedup if speedup > 0 else math.inf
        out["text"] = (
            f"No variant beats {base_name}: the fastest other variant, {name}, is "
            f"{fmt_ratio(slower)} slower ({detail})"
        )
        if "chosen" in run.results and speedup > 1.0:  # optimize: faster ones were over the budget
            out["text"] = (
                f"Nothing was chosen over {base_name}: the fastest other variant, {name} "
                f"({fmt_ratio(speedup)} faster), is outside the accuracy budget or within the noise"
            )
    if run.results.get("converged") is False:
        out["caveat"] = (
            "The benchmark hit its time limit before the spread fell under its target: "
            "these numbers are noisier than usual."
        )
    return out


def _variant_rows(runs: list[Run]) -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = []
    bench_runs = [r for r in runs if _variants(r)]
    if not bench_runs:
        return None
    all_variants = [v for r in bench_runs for v in _variants(r)]
    as_percent = _is_fraction_metric([v.get("accuracy") for v in all_variants])
    for run in bench_runs:
        info = _analyse(run)
        assert info is not None
        base = info["variants"][info["baseline"]]
        for i, v in enumerate(info["variants"]):
            speedup = info["speedups"][i]
            role = "baseline" if i == info["baseline"] else ("winner" if i == info["winner"] else "")
            acc = _accuracy_delta(v, base, as_percent) if i != info["baseline"] else None
            rows.append(
                {
                    "run": run.name,
                    "run_id": run.id,
                    "name": str(v.get("name", f"variant {i}")),
                    "p50": _p(v, "p50"),
                    "p90": _p(v, "p90"),
                    "p99": _p(v, "p99"),
                    "throughput": num(v.get("throughput_per_s")),
                    "size": num(v.get("size_bytes")),
                    "accuracy": num(v.get("accuracy")),
                    "accuracy_delta": acc["delta"] if acc else None,
                    "memory": num(v.get("peak_memory_bytes")),
                    "speedup": speedup,
                    "speedup_iqr": num(v.get("speedup_iqr")),
                    "rounds": num(v.get("rounds")),
                    "role": role,
                }
            )
    present = {
        key: any(r[key] is not None for r in rows)
        for key in ("p50", "p90", "p99", "throughput", "size", "accuracy", "memory", "speedup", "rounds")
    }
    max_speedup = max([r["speedup"] for r in rows if r["speedup"] is not None] + [1.0])
    for r in rows:
        r["bar"] = 0 if r["speedup"] is None else max(2.0, min(100.0, 100.0 * r["speedup"] / max_speedup))
        r["accuracy_text"] = fmt_accuracy(r["accuracy"], as_percent)
        delta = r["accuracy_delta"]
        if delta is None:
            r["accuracy_delta_text"] = None
        elif as_percent:
            text = f"{delta * 100:+.2f} pts"
            r["accuracy_delta_text"] = "±0.00 pts" if text[1:5] == "0.00" else text
        else:
            r["accuracy_delta_text"] = f"{delta:+.3g}" if delta else "±0"
    multi = len(bench_runs) > 1
    labels = [f"{r['run']} · {r['name']}" if multi else r["name"] for r in rows]
    if present["accuracy"] and sum(r["accuracy"] is not None and r["p50"] is not None for r in rows) >= 2:
        chart = charts.pareto_chart(
            [
                {
                    "label": label,
                    "latency_ms": r["p50"],
                    "accuracy": r["accuracy"],
                    "size_bytes": r["size"],
                    "role": r["role"],
                }
                for label, r in zip(labels, rows, strict=True)
            ],
            accuracy_as_percent=as_percent,
        )
        chart_title = "Latency against accuracy"
        chart_caption = (
            "Each point is a variant: further left is faster, higher is more accurate"
            + (", marker area is proportional to model size" if present["size"] else "")
            + ". The dashed line joins the variants no other variant beats on both."
        )
    elif present["speedup"] and len(rows) >= 2:
        chart = charts.speedup_chart(
            [
                {"label": label, "speedup": r["speedup"], "iqr": r["speedup_iqr"], "role": r["role"]}
                for label, r in zip(labels, rows, strict=True)
            ]
        )
        chart_title = "Speedup against the baseline"
        chart_caption = "Bars right of the dashed line are faster than their run's baseline."
    else:
        chart, chart_title, chart_caption = None, None, None
    skipped, notes = [], []
    for run in bench_runs:  # optimize runs: candidates not measured (and why), the front and the choice
        why = run.results.get("skipped")
        if isinstance(why, dict):
            skipped += [{"run": run.name, "name": str(k), "why": str(v)} for k, v in why.items()]
        for key in ("message", "stopped_early"):
            if isinstance(run.results.get(key), str):
                notes.append(run.results[key])
        front = run.results.get("front")
        if isinstance(front, list) and front:
            axis = {"throughput": "sustained rate", "size": "size", "memory": "memory"}.get(
                str(run.results.get("objective")), "speedup"
            )
            notes.append(f"Pareto front ({axis}, accuracy, size): " + ", ".join(map(str, front)))
            if isinstance(run.results.get("objective"), str):
                notes.append(f"Objective: {run.results['objective']}.")
        if isinstance(run.results.get("accuracy_budget"), (int, float)):
            budget = 100 * run.results["accuracy_budget"]
            notes.append(f"Accuracy budget: {budget:g} points below the baseline.")
    return {
        "skipped": skipped,
        "notes": notes,
        "rows": rows,
        "present": present,
        "multi_run": multi,
        "as_percent": as_percent,
        "chart": chart,
        "chart_title": chart_title,
        "chart_caption": chart_caption,
    }


def _sweeps(runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        sweep = run.results.get("sweep")
        if not isinstance(sweep, list) or not sweep:
            continue
        series: dict[str, list[dict[str, Any]]] = {}
        for point in sweep:
            if (
                isinstance(point, dict)
                and num(point.get("batch_size")) is not None
                and num(point.get("throughput_per_s")) is not None
            ):
                series.setdefault(str(point.get("variant", "?")), []).append(point)
        info = _analyse(run)
        colors: dict[str, str] = {}
        if info is not None:
            names = [str(v.get("name")) for v in info["variants"]]
            roles = [
                "baseline" if i == info["baseline"] else ("winner" if i == info["winner"] else "")
                for i in range(len(names))
            ]
            colors = charts.role_colors(names, roles)
        best = []
        for variant, points in series.items():
            scored = [p for p in points if num(p.get("throughput_per_s")) is not None]
            if scored:
                top = max(scored, key=lambda p: num(p.get("throughput_per_s")) or 0.0)
                best.append(
                    {
                        "variant": variant,
                        "batch": num(top.get("batch_size")),
                        "throughput": num(top.get("throughput_per_s")),
                        "p50": num(top.get("latency_p50_ms")),
                        "points": len(points),
                    }
                )
        if not series:
            continue
        stopped = run.results.get("sweep_stopped")
        out.append(
            {
                "run": run,
                "chart": charts.sweep_chart(series, colors),
                "best": best,
                "stopped": str(stopped) if stopped else None,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- kinds


def _stat(label: str, value: str, note: str | None = None) -> dict[str, Any]:
    return {"label": label, "value": value, "note": note}


def _trains(runs: list[Run], out_dir: Path) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        if run.kind != "train":
            continue
        res = run.results
        curve = [p for p in res.get("curve") or [] if isinstance(p, dict)]
        val = [p for p in res.get("val") or [] if isinstance(p, dict)]
        summary = res.get("summary") if isinstance(res.get("summary"), dict) else {}
        stats = []
        if num(summary.get("steps")) is not None:
            stats.append(_stat("steps", fmt_number(summary["steps"])))
        if num(summary.get("epochs_completed")) is not None:
            stats.append(_stat("epochs", fmt_number(summary["epochs_completed"])))
        if num(summary.get("train_time_s")) is not None:
            stats.append(_stat("train time", fmt_seconds(summary["train_time_s"])))
        if num(summary.get("samples_per_s")):
            stats.append(_stat("samples/s", fmt_rate(summary["samples_per_s"])))
        if num(summary.get("tokens_per_s")):
            stats.append(_stat("tokens/s", fmt_rate(summary["tokens_per_s"])))
        if num(summary.get("final_loss")) is not None:
            stats.append(_stat("final loss", f"{summary['final_loss']:.4g}"))
        for key, value in summary.items():
            if key.startswith("val_") and num(value) is not None:
                text = fmt_pct(value, 2) if "acc" in key and 0 <= value <= 1 else f"{value:.4g}"
                stats.append(_stat(key.replace("_", " "), text))
        if num(summary.get("mfu")):
            stats.append(_stat("MFU", fmt_pct(summary["mfu"])))
        if summary.get("stopped_early"):
            stats.append(_stat("stopped early", "yes"))
        if num(summary.get("skipped_steps")):
            stats.append(_stat("skipped steps", fmt_number(summary["skipped_steps"]), "fp16 overflow"))
        if num(summary.get("nonfinite_losses")):
            stats.append(_stat("non-finite losses", fmt_number(summary["nonfinite_losses"])))
        val_keys: list[str] = []
        for row in val:
            for key in row:
                if key not in val_keys:
                    val_keys.append(key)
        val_rows = val[-VAL_ROWS:]
        links = [
            a
            for a in _artifacts(run, out_dir)
            if a["key"] in ("run_dir", "metrics", "tensorboard", "checkpoint", "last_checkpoint")
        ]
        if not (curve or val or stats):
            continue
        out.append(
            {
                "run": run,
                "stats": stats,
                "chart": charts.training_chart(curve, val) if (curve or val) else None,
                "val_keys": val_keys,
                "val_rows": [[_cell(row.get(k)) for k in val_keys] for row in val_rows],
                "val_hidden": max(0, len(val) - VAL_ROWS),
                "links": links,
            }
        )
    return out


def _cell(value: Any) -> str:
    v = num(value)
    if v is None:
        return "—" if value is None else str(value)
    if v == int(v):
        return f"{int(v):,}"
    return f"{v:.4g}"


def _memory_block(memory: dict[str, Any], title: str | None) -> dict[str, Any] | None:
    timeline = memory.get("timeline")
    timeline = [p for p in timeline if isinstance(p, dict)] if isinstance(timeline, list) else []
    peak = num(memory.get("peak_bytes"))
    if peak is None and timeline:
        values = [b for b in (num(p.get("bytes")) for p in timeline) if b is not None]
        peak = max(values) if values else None
    if not timeline and peak is None:
        return None
    return {
        "chart": charts.memory_timeline_chart(timeline, title=title) if timeline else None,
        "peak": peak,
        "source": memory.get("source"),
        "phased": any(p.get("phase") for p in timeline),
    }


def _profiles(runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        if run.kind != "profile":
            continue
        res = run.results
        ops = [op for op in res.get("top_ops") or [] if isinstance(op, dict)]
        ops_sorted = sorted(ops, key=lambda op: -(num(op.get("self_ms")) or 0.0))
        modules = [m for m in res.get("modules") or [] if isinstance(m, dict)]
        modules = sorted(modules, key=lambda m: -(num(m.get("total_ms")) or 0.0))[:MODULE_ROWS]
        stats = []
        for key, label in (("model", "model"), ("mode", "mode")):
            if res.get(key):
                stats.append(_stat(label, str(res[key])))
        if num(res.get("batch_size")) is not None:
            stats.append(_stat("batch", fmt_number(res["batch_size"])))
        if num(res.get("step_ms")) is not None:
            stats.append(_stat("step", fmt_ms(res["step_ms"])))
        if num(res.get("flops_per_step")):
            stats.append(_stat("FLOPs / step", fmt_flops(res["flops_per_step"])))
        if num(res.get("achieved_flops_per_s")):
            stats.append(_stat("achieved", fmt_flops(res["achieved_flops_per_s"]) + "/s"))
        if num(res.get("peak_flops_per_s")):
            stats.append(_stat("machine peak", fmt_flops(res["peak_flops_per_s"]) + "/s"))
        if num(res.get("mfu")) is not None:
            stats.append(_stat("MFU", fmt_pct(res["mfu"])))
        memory = res.get("memory") if isinstance(res.get("memory"), dict) else {}
        mem = _memory_block(memory, None)
        if mem and mem["peak"] is not None:
            stats.append(_stat("peak memory", fmt_bytes(mem["peak"])))
        uncounted = res.get("uncounted_ops")
        uncounted = [str(u) for u in uncounted] if isinstance(uncounted, list) else []
        if not (ops or modules or stats or mem):
            continue
        out.append(
            {
                "run": run,
                "stats": stats,
                "ops_chart": charts.top_ops_chart(ops_sorted) if ops else None,
                "ops": ops_sorted[:TOP_OPS_ROWS],
                "ops_hidden": max(0, len(ops) - TOP_OPS_ROWS),
                "modules": modules,
                "memory": mem,
                "uncounted": uncounted,
            }
        )
    return out


def _memories(runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        if run.kind != "memory":
            continue
        res = run.results
        phases = [p for p in res.get("phases") or [] if isinstance(p, dict)]
        acts = [a for a in res.get("activation_bytes_by_module") or [] if isinstance(a, dict)]
        acts = sorted(acts, key=lambda a: -(num(a.get("saved_bytes")) or 0.0))
        mem = _memory_block(res, None)
        peaks = [p for p in (num(ph.get("peak_bytes")) for ph in phases) if p is not None]
        peak = max(peaks) if peaks else (mem["peak"] if mem else None)
        stats = []
        for key in ("model", "device"):
            if res.get(key):
                stats.append(_stat(key, str(res[key])))
        if num(res.get("batch_size")) is not None:
            stats.append(_stat("batch", fmt_number(res["batch_size"])))
        if peak is not None:
            stats.append(_stat("peak memory", fmt_bytes(peak)))
        if acts:
            total = sum(num(a.get("saved_bytes")) or 0.0 for a in acts)
            stats.append(_stat("saved activations", fmt_bytes(total)))
        if not (phases or acts or mem):
            continue
        out.append(
            {
                "run": run,
                "stats": stats,
                "source": res.get("source"),
                "memory": mem,
                "phases": phases,
                "acts": acts[:ACTIVATION_ROWS],
                "acts_hidden": max(0, len(acts) - ACTIVATION_ROWS),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- env, links


def _environments(runs: list[Run]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        env = run.env if isinstance(run.env, dict) else {}
        if not env:
            continue
        view = _env_view(env)
        key = json.dumps(view, sort_keys=True, default=str)
        group = groups.setdefault(key, {"view": view, "runs": []})
        group["runs"].append(run)
    return list(groups.values())


def _env_view(env: dict[str, Any]) -> dict[str, Any]:
    def d(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    cpu, cuda, torch_, plat = (
        d(env.get("cpu")),
        d(env.get("cuda")),
        d(env.get("torch")),
        d(env.get("platform")),
    )
    software = []
    if env.get("python"):
        software.append(("python", str(env["python"])))
    if torch_.get("version"):
        git = torch_.get("git_version")
        software.append(("torch", str(torch_["version"]) + (f" ({str(git)[:10]})" if git else "")))
    for name, version in d(env.get("packages")).items():
        if version:
            software.append((str(name), str(version)))
    if plat:
        software.append(
            ("platform", " ".join(str(plat[k]) for k in ("system", "release", "machine") if plat.get(k)))
        )
    if env.get("git_commit"):
        software.append(("git commit", str(env["git_commit"])[:12]))
    hardware = []
    if cpu.get("model"):
        hardware.append(("CPU", str(cpu["model"])))
    if cpu.get("physical_cores") or cpu.get("logical_cores"):
        hardware.append(
            ("cores", f"{cpu.get('physical_cores', '?')} physical, {cpu.get('logical_cores', '?')} logical")
        )
    if cpu.get("torch_threads") is not None:
        interop = cpu.get("torch_interop_threads")
        hardware.append(
            (
                "torch threads",
                f"{cpu['torch_threads']}" + (f" (interop {interop})" if interop is not None else ""),
            )
        )
    thread_env = d(cpu.get("thread_env"))
    if thread_env:
        hardware.append(("thread env", ", ".join(f"{k}={v}" for k, v in thread_env.items())))
    if cpu.get("capability"):
        hardware.append(("ATen CPU capability", str(cpu["capability"])))
    backends = [
        name
        for name, key in (
            ("oneDNN", "mkldnn"),
            ("oneDNN bf16", "mkldnn_bf16"),
            ("oneDNN fp16", "mkldnn_fp16"),
            ("MKL", "mkl"),
            ("OpenMP", "openmp"),
        )
        if cpu.get(key)
    ]
    if backends:
        hardware.append(("CPU backends", ", ".join(backends)))
    gpus = []
    for dev in cuda.get("devices") or []:
        if isinstance(dev, dict):
            memory = fmt_bytes(dev.get("total_memory_bytes"))
            sm = dev.get("capability", "?")
            gpus.append(f"cuda:{dev.get('index', '?')} {dev.get('name', '?')} (sm {sm}, {memory})")
    if gpus:
        hardware.append(("GPU", "; ".join(gpus)))
        versions = " / ".join(str(v) for v in (cuda.get("cuda_version"), cuda.get("cudnn_version")) if v)
        if versions:
            hardware.append(("CUDA / cuDNN", versions))
    elif cuda:
        hardware.append(("GPU", "none (CPU only)"))
    flags = d(cpu.get("flags"))
    peaks = [(str(k), fmt_flops(v) + "/s") for k, v in d(env.get("peak_flops")).items() if num(v)]
    return {
        "software": software,
        "hardware": hardware,
        "flags": [(str(k), bool(v)) for k, v in flags.items()],
        "peaks": peaks,
    }


def _env_line(runs: list[Run]) -> str | None:
    """A one-line summary of the (first) environment for the banner."""
    for run in runs:
        env = run.env if isinstance(run.env, dict) else {}
        if not env:
            continue
        cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}
        cuda = env.get("cuda") if isinstance(env.get("cuda"), dict) else {}
        torch_ = env.get("torch") if isinstance(env.get("torch"), dict) else {}
        parts = []
        devices = [d for d in cuda.get("devices") or [] if isinstance(d, dict)]
        if devices:
            parts.append(str(devices[0].get("name", "GPU")))
        if cpu.get("model"):
            parts.append(str(cpu["model"]))
        if torch_.get("version"):
            parts.append(f"torch {torch_['version']}")
        if not devices and cuda:
            parts.append("no GPU")
        return " · ".join(parts) or None
    return None


def _href(path: str, out_dir: Path) -> str:
    """A relative URL from the report's folder to ``path`` (relative paths are taken from the cwd)."""
    target = Path(path)
    if not target.is_absolute():
        target = Path.cwd() / target
    try:
        rel = os.path.relpath(target, out_dir.resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return target.resolve().as_uri()
    rel = rel.replace(os.sep, "/")
    url = quote(rel, safe="/._-~")
    # A first segment containing ':' would read as a URL scheme (javascript:, http:); quote() has
    # already encoded ':' as %3A, but keep relative links explicit anyway.
    return url if url.startswith("../") else "./" + url


def _artifacts(run: Run, out_dir: Path) -> list[dict[str, Any]]:
    arts = run.artifacts if isinstance(run.artifacts, dict) else {}
    items = []
    for key, path in arts.items():
        path = str(path)
        items.append({"key": str(key), "path": path, "href": _href(path, out_dir)})
    return items


def _pretty_json(value: Any, limit: int = 20000) -> str | None:
    if not value:
        return None
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "\n… (truncated)"


# ---------------------------------------------------------------------------------------------- render


def build_context(runs: list[Run], out_path: Path, title: str | None = None) -> dict[str, Any]:
    """Everything the template shows, computed from ``runs`` (exposed for tests and other renderers)."""
    out_dir = Path(out_path).parent
    headlines = []
    for run in runs:
        h = headline(run)
        if h is not None:
            h["run"] = run
            headlines.append(h)
    variants = _variant_rows(runs)
    sweeps = _sweeps(runs)
    trains = _trains(runs, out_dir)
    profiles = _profiles(runs)
    memories = _memories(runs)
    environments = _environments(runs)
    run_items = [
        {
            "run": run,
            "artifacts": _artifacts(run, out_dir),
            "config": _pretty_json(run.config),
            "conditions": _conditions(run) if _variants(run) else "",
        }
        for run in runs
    ]
    sections = [
        (anchor, label)
        for anchor, label, present in (
            ("summary", "Variants", variants),
            ("sweep", "Throughput vs batch", sweeps),
            ("training", "Training", trains),
            ("profile", "Profile", profiles),
            ("memory", "Memory", memories),
            ("environment", "Environment", environments),
            ("runs", "Runs", runs),
        )
        if present
    ]
    if title is None:
        names = list(dict.fromkeys(run.name for run in runs))
        title = "torchkiln report: " + ", ".join(names[:4]) + (" …" if len(names) > 4 else "")
    from torchkiln import __version__

    return {
        "title": title,
        "csp": CSP,
        "headlines": headlines,
        "env_line": _env_line(runs),
        "variants": variants,
        "sweeps": sweeps,
        "trains": trains,
        "profiles": profiles,
        "memories": memories,
        "environments": environments,
        "runs": run_items,
        "sections": sections,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
    }


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=fmt_created,
        ms=fmt_ms,
        bytes=fmt_bytes,
        rate=fmt_rate,
        flops=fmt_flops,
        ratio=fmt_ratio,
        pct=fmt_pct,
        number=fmt_number,
    )
    return env


def render_report(runs: list[Run], out_path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write one self-contained HTML report of ``runs`` to ``out_path`` and return its path.

    Runs of any kind combine: bench-like runs (anything with ``variants``) feed the headline, the
    variants table and the Pareto/speedup chart; ``sweep`` the throughput curves; train runs the
    training curves; profile runs the operator tables; profile and memory runs the memory timelines.
    """
    from markupsafe import Markup

    if not runs:
        raise ValueError("render_report needs at least one run")
    out = Path(out_path)
    context = build_context(list(runs), out, title)
    # Chart SVGs are generated by us (text drawn as paths, comments stripped): safe to inline.
    for group in ("sweeps", "trains"):
        for item in context[group]:
            if item.get("chart"):
                item["chart"] = Markup(item["chart"])
    if context["variants"] and context["variants"]["chart"]:
        context["variants"]["chart"] = Markup(context["variants"]["chart"])
    for item in context["profiles"]:
        if item["ops_chart"]:
            item["ops_chart"] = Markup(item["ops_chart"])
    for item in context["profiles"] + context["memories"]:
        if item["memory"] and item["memory"]["chart"]:
            item["memory"]["chart"] = Markup(item["memory"]["chart"])
    html = _environment().get_template("report.html.j2").render(**context)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return out


def report_for(
    run_ids: str | Sequence[str],
    history: History | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    attach: bool = True,
) -> Path:
    """Render the report for runs named by id, id prefix or ``kind:name``; attach it to each run.

    The default output is ``runs/report-<first run id>.html``. With ``attach`` the report's path is
    recorded as the ``report`` artifact of every run in it.
    """
    if isinstance(run_ids, str):
        run_ids = [run_ids]
    if not run_ids:
        raise ValueError("report_for needs at least one run id")
    if not isinstance(history, History):
        history = History(history)
    runs = []
    for rid in run_ids:
        run = history.get(rid)
        if all(r.id != run.id for r in runs):
            runs.append(run)
    path = Path(out) if out is not None else Path("runs") / f"report-{runs[0].id}.html"
    path = render_report(runs, path, title=title)
    if attach:
        for run in runs:
            history.add_artifact(run.id, "report", path.resolve())
    return path
