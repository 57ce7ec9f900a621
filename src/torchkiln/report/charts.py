"""Charts for the HTML report: matplotlib figures rendered to self-contained inline ``<svg>`` strings.

Each chart function takes plain data (the shapes of ``report/schema.py``, already cleaned by
``report/html.py``) and returns one ``<svg>`` element ready to paste into HTML: text is drawn as
paths (no fonts needed), comments, metadata and namespace URLs are removed, and element ids are
prefixed so that several charts can share one page. pyplot is never imported (no global state, no
display); figures are plain ``matplotlib.figure.Figure`` objects on the Agg canvas.

>>> svg = speedup_chart([{"label": "fp32", "speedup": 1.0, "role": "baseline"},
...                      {"label": "int8", "speedup": 2.5, "role": "winner"}])
>>> svg.startswith("<svg") and "http" not in svg
True
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

__all__ = [
    "BASELINE_COLOR",
    "label_text",
    "PALETTE",
    "WINNER_COLOR",
    "memory_timeline_chart",
    "pareto_chart",
    "role_colors",
    "speedup_chart",
    "svg_from_figure",
    "sweep_chart",
    "top_ops_chart",
    "training_chart",
]

BASELINE_COLOR = "#868e96"
WINNER_COLOR = "#2f9e44"
PALETTE = ("#3b5bdb", "#e8590c", "#ae3ec9", "#1098ad", "#f08c00", "#c2255c", "#5c940d", "#495057")
_INK = "#343a40"
_MUTED = "#6c757d"
_PHASE_COLORS = {
    "initial": "#dee2e6",
    "forward": "#d0ebff",
    "backward": "#ffe8cc",
    "optimizer": "#d3f9d8",
}
_EXTRA_PHASE_COLORS = ("#f3d9fa", "#fff3bf", "#e3fafc", "#ffdeeb")
MAX_POINTS = 2000

_RC: dict[str, Any] = {
    "svg.fonttype": "path",  # text as paths: the SVG needs no font and renders the same everywhere
    "svg.hashsalt": "torchkiln",  # deterministic ids
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "text.color": _INK,
    "axes.edgecolor": "#adb5bd",
    "axes.linewidth": 0.8,
    "axes.labelcolor": _INK,
    "axes.labelsize": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlepad": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e9ecef",
    "grid.linewidth": 0.8,
    "xtick.color": _MUTED,
    "ytick.color": _MUTED,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "lines.linewidth": 1.8,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
}


# --------------------------------------------------------------------------------------------- helpers


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def label_text(value: Any, limit: int = 48) -> str:
    """A user-provided string made safe for matplotlib text: ``$`` would start mathtext."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


_ID = re.compile(r'\bid="([^"]+)"')
_HREF = re.compile(r'(?:xlink:)?href="#([^"]+)"')
_URL = re.compile(r"url\(#([^)]+)\)")


def svg_from_figure(fig: Figure) -> str:
    """Render ``fig`` to an inline-ready ``<svg>`` string (no XML prolog, comments or external URLs)."""
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg)
    svg = re.sub(r'\s+version="[^"]*"', "", svg, count=1)
    # Responsive: keep the viewBox, let CSS set the width.
    svg = re.sub(r'(<svg[^>]*?)\s+width="[^"]*"', r"\1", svg, count=1)
    svg = re.sub(r'(<svg[^>]*?)\s+height="[^"]*"', r"\1", svg, count=1)
    # Ids must be unique in the page: prefix them with a hash of this chart's content.
    prefix = "k" + hashlib.sha1(svg.encode()).hexdigest()[:8] + "-"
    svg = _ID.sub(lambda m: f'id="{prefix}{m.group(1)}"', svg)
    svg = _HREF.sub(lambda m: f'href="#{prefix}{m.group(1)}"', svg)
    svg = _URL.sub(lambda m: f"url(#{prefix}{m.group(1)})", svg)
    svg = svg.replace("<svg", '<svg role="img" preserveAspectRatio="xMidYMid meet"', 1)
    svg = re.sub(r">\s+<", "><", svg)
    return svg.strip()


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _downsample(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ``limit`` points, keeping the maximum of each bucket (so peaks survive)."""
    if len(points) <= limit:
        return points
    size = len(points) / limit
    out = []
    for i in range(limit):
        bucket = points[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)]
        out.append(max(bucket, key=lambda p: p[1]))
    return out


def _stride(points: list[Any], limit: int = MAX_POINTS) -> list[Any]:
    if len(points) <= limit:
        return points
    step = math.ceil(len(points) / limit)
    return points[::step] + ([points[-1]] if (len(points) - 1) % step else [])


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _bytes_unit(max_bytes: float) -> tuple[float, str]:
    scale, unit = 1.0, "B"
    for i, name in enumerate(_BINARY_UNITS):
        if max_bytes >= 1024**i:
            scale, unit = 1024.0**i, name
    return scale, unit


def role_colors(labels: Sequence[str], roles: Sequence[str]) -> dict[str, str]:
    """A color per label: grey for the baseline, green for the winner, the palette for the rest."""
    colors: dict[str, str] = {}
    i = 0
    for label, role in zip(labels, roles, strict=False):
        if label in colors:
            continue
        if role == "baseline":
            colors[label] = BASELINE_COLOR
        elif role == "winner":
            colors[label] = WINNER_COLOR
        else:
            colors[label] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def _empty(text: str) -> str:
    fig = _figure(8, 1.2)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", color=_MUTED, transform=ax.transAxes)
    return svg_from_figure(fig)


# ---------------------------------------------------------------------------------------------- charts


def speedup_chart(bars: Sequence[dict[str, Any]]) -> str:
    """Horizontal bars of speedup vs baseline (``label``, ``speedup``, optional ``iqr`` and ``role``)."""
    bars = [b for b in bars if _finite(b.get("speedup")) is not None]
    if not bars:
        return _empty("no speedups to show")
    with matplotlib.rc_context(_RC):
        fig = _figure(8.6, 0.9 + 0.42 * len(bars))
        ax = fig.add_subplot()
        labels = [label_text(b["label"]) for b in bars]
        roles = [b.get("role", "") for b in bars]
        colors = role_colors(labels, roles)
        ys = list(range(len(bars)))[::-1]
        values = [float(b["speedup"]) for b in bars]
        errs = [(_finite(b.get("iqr")) or 0.0) / 2 for b in bars]
        ax.barh(ys, values, color=[colors[label] for label in labels], height=0.62, zorder=2)
        if any(errs):
            ax.errorbar(values, ys, xerr=errs, fmt="none", ecolor=_INK, elinewidth=0.9, capsize=2.5, zorder=3)
        ax.axvline(1.0, color=_INK, linewidth=1.0, linestyle=(0, (4, 3)), zorder=4)
        top = max(values + [1.0])
        for y, v, e in zip(ys, values, errs, strict=True):
            ax.text(v + e + top * 0.012, y, f"{v:.2f}×", va="center", ha="left", fontsize=9, color=_INK)
        ax.set_yticks(ys, labels)
        ax.set_xlim(0, top * 1.14)
        ax.set_xlabel("speedup vs baseline (× faster, median of paired ratios; whiskers: IQR)")
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
        return svg_from_figure(fig)


def pareto_chart(points: Sequence[dict[str, Any]], *, accuracy_as_percent: bool = False) -> str:
    """Latency (x) against accuracy (y), marker area proportional to ``size_bytes``; the front is drawn.

    Each point: ``label``, ``latency_ms``, ``accuracy``, optional ``size_bytes`` and ``role``.
    """
    pts = [
        p
        for p in points
        if _finite(p.get("latency_ms")) is not None and _finite(p.get("accuracy")) is not None
    ]
    if not pts:
        return _empty("no variants with both latency and accuracy")
    with matplotlib.rc_context(_RC):
        fig = _figure(8.6, 3.7)
        ax = fig.add_subplot()
        labels = [label_text(p["label"]) for p in pts]
        colors = role_colors(labels, [p.get("role", "") for p in pts])
        xs = [float(p["latency_ms"]) for p in pts]
        scale = 100.0 if accuracy_as_percent else 1.0
        ys = [float(p["accuracy"]) * scale for p in pts]
        sizes = [_finite(p.get("size_bytes")) for p in pts]
        known = [s for s in sizes if s]
        if known:
            biggest = max(known)
            areas = [60 + 840 * (s / biggest) if s else 60 for s in sizes]
        else:
            areas = [160] * len(pts)
        # The Pareto front: no other point is both faster and more accurate.
        order = sorted(range(len(pts)), key=lambda i: (xs[i], -ys[i]))
        front, best = [], -math.inf
        for i in order:
            if ys[i] > best:
                front.append(i)
                best = ys[i]
        if len(front) > 1:
            fx = [xs[i] for i in front]
            fy = [ys[i] for i in front]
            ax.step(fx, fy, where="post", color="#adb5bd", linestyle=(0, (4, 3)), linewidth=1.2, zorder=1)
        for i in range(len(pts)):
            ax.scatter(
                xs[i], ys[i], s=areas[i], color=colors[labels[i]], alpha=0.85, edgecolor="white", zorder=3
            )
            weight = "bold" if pts[i].get("role") == "winner" else "normal"
            ax.annotate(
                labels[i],
                (xs[i], ys[i]),
                xytext=(0, 6 + math.sqrt(areas[i]) / 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8.5,
                fontweight=weight,
                color=_INK,
            )
        xpad = (max(xs) - min(xs)) * 0.15 or max(xs) * 0.2 or 1.0
        ypad = (max(ys) - min(ys)) * 0.25 or abs(max(ys)) * 0.02 or 0.01
        ax.set_xlim(max(0.0, min(xs) - xpad), max(xs) + xpad)
        ax.set_ylim(min(ys) - ypad, max(ys) + ypad * 1.6)
        ax.set_xlabel("latency p50 (ms)  —  lower is better")
        ax.set_ylabel("accuracy (%)" if accuracy_as_percent else "accuracy")
        ax.text(
            0.99,
            0.02,
            "marker area ∝ model size" if known else "model size unknown",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color=_MUTED,
        )
        ax.text(0.01, 0.98, "better ↖", transform=ax.transAxes, ha="left", va="top", fontsize=8, color=_MUTED)
        return svg_from_figure(fig)


def sweep_chart(series: dict[str, list[dict[str, Any]]], colors: dict[str, str] | None = None) -> str:
    """Throughput (and p50 latency where known) against batch size, one line per variant.

    ``series`` maps a variant label to points with ``batch_size``, ``throughput_per_s`` and
    optional ``latency_p50_ms``.
    """
    clean: dict[str, list[tuple[float, float, float | None]]] = {}
    for label, pts in series.items():
        rows = []
        for p in pts:
            b, t = _finite(p.get("batch_size")), _finite(p.get("throughput_per_s"))
            if b is not None and b > 0 and t is not None:
                rows.append((b, t, _finite(p.get("latency_p50_ms"))))
        if rows:
            clean[label] = sorted(rows)
    if not clean:
        return _empty("no sweep points")
    has_latency = any(r[2] is not None for rows in clean.values() for r in rows)
    with matplotlib.rc_context(_RC):
        fig = _figure(8.6, 3.4)
        axes = fig.subplots(1, 2) if has_latency else [fig.add_subplot()]
        colors = dict(colors or {})
        i = 0
        for label in clean:
            if label not in colors:
                colors[label] = PALETTE[i % len(PALETTE)]
                i += 1
        batches = sorted({r[0] for rows in clean.values() for r in rows})
        for label, rows in clean.items():
            kw = {"color": colors[label], "marker": "o", "markersize": 3.5, "label": label_text(label, 32)}
            axes[0].plot([r[0] for r in rows], [r[1] for r in rows], **kw)
            if has_latency:
                lat = [(r[0], r[2]) for r in rows if r[2] is not None]
                axes[1].plot([p[0] for p in lat], [p[1] for p in lat], **kw)
        axes[0].set_title("throughput")
        axes[0].set_ylabel("samples / s")
        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
        axes[0].set_ylim(bottom=0)
        if has_latency:
            axes[1].set_title("latency p50")
            axes[1].set_ylabel("ms")
            axes[1].set_ylim(bottom=0)
        for ax in axes:
            if len(batches) > 1 and batches[-1] / batches[0] >= 8:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("batch size")
        axes[0].legend(loc="best")
        return svg_from_figure(fig)


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def training_chart(curve: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]]) -> str:
    """Loss (train, and validation loss where recorded), learning rate, and other validation metrics
    against the optimizer step."""
    loss = [
        (s, v)
        for p in curve
        if (s := _finite(p.get("step"))) is not None and (v := _finite(p.get("loss"))) is not None
    ]
    lr = [
        (s, v)
        for p in curve
        if (s := _finite(p.get("step"))) is not None and (v := _finite(p.get("lr"))) is not None
    ]
    val_loss = [
        (s, v)
        for p in val
        if (s := _finite(p.get("step"))) is not None and (v := _finite(p.get("val_loss"))) is not None
    ]
    metric_names: list[str] = []
    for p in val:
        for key, value in p.items():
            if (
                key not in ("step", "epoch", "val_loss")
                and _finite(value) is not None
                and key not in metric_names
            ):
                metric_names.append(key)
    panels = [name for name, present in (("loss", loss or val_loss), ("lr", lr)) if present]
    if metric_names:
        panels.append("metrics")
    if not panels:
        return _empty("no training curve recorded")
    with matplotlib.rc_context(_RC):
        fig = _figure(8.6, 3.2)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels, strict=True):
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            if panel == "loss":
                ax.set_title("loss")
                if loss:
                    pts = _stride(loss)
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                    if len(pts) > 50:  # raw loss is noisy: draw it faint with a smoothed line on top
                        ax.plot(xs, ys, color=PALETTE[0], alpha=0.25, linewidth=1.0)
                        ax.plot(xs, _smooth(ys), color=PALETTE[0], label="train (smoothed)")
                    else:
                        ax.plot(xs, ys, color=PALETTE[0], label="train")
                if val_loss:
                    ax.plot(
                        [p[0] for p in val_loss],
                        [p[1] for p in val_loss],
                        color=PALETTE[1],
                        marker="o",
                        markersize=3.5,
                        label="validation",
                    )
                ax.legend(loc="upper right")
            elif panel == "lr":
                ax.set_title("learning rate")
                pts = _stride(lr)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=PALETTE[2])
                ax.set_ylim(bottom=0)
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
            else:
                ax.set_title("validation")
                for i, name in enumerate(metric_names):
                    pts = [
                        (s, v)
                        for p in val
                        if (s := _finite(p.get("step"))) is not None
                        and (v := _finite(p.get(name))) is not None
                    ]
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        color=PALETTE[(i + 3) % len(PALETTE)],
                        marker="o",
                        markersize=3.5,
                        label=label_text(name, 24),
                    )
                ax.legend(loc="best")
        return svg_from_figure(fig)


def _smooth(values: list[float]) -> list[float]:
    """A centered moving average over about 1/25 of the points (no lag, unlike an EMA)."""
    half = max(1, len(values) // 50)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def top_ops_chart(ops: Sequence[dict[str, Any]], limit: int = 15) -> str:
    """Horizontal bars of self time for the most expensive operators (``name``, ``self_ms``)."""
    rows = [
        (str(op.get("name", "?")), v, _finite(op.get("self_pct")))
        for op in ops
        if (v := _finite(op.get("self_ms"))) is not None
    ]
    rows = sorted(rows, key=lambda r: -r[1])[:limit]
    if not rows:
        return _empty("no operator timings")
    with matplotlib.rc_context(_RC):
        fig = _figure(8.6, 0.8 + 0.3 * len(rows))
        ax = fig.add_subplot()
        ys = list(range(len(rows)))[::-1]
        values = [r[1] for r in rows]
        ax.barh(ys, values, color=PALETTE[0], height=0.66, zorder=2)
        top = max(values)
        for y, (_, v, pct) in zip(ys, rows, strict=True):
            text = f"{v:.3g} ms" + (f"  ({pct:.1f}%)" if pct is not None else "")
            ax.text(v + top * 0.01, y, text, va="center", ha="left", fontsize=8, color=_INK)
        ax.set_yticks(ys, [label_text(r[0], 40) for r in rows])
        ax.set_xlim(0, top * 1.22)
        ax.set_xlabel("self time (ms, whole profiled window)")
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
        return svg_from_figure(fig)


def memory_timeline_chart(timeline: Sequence[dict[str, Any]], *, title: str | None = None) -> str:
    """Memory in use against time (``t_ms``, ``bytes``, optional ``phase``); phases shaded, peak marked."""
    raw = [
        (t, b, p.get("phase"))
        for p in timeline
        if (t := _finite(p.get("t_ms"))) is not None and (b := _finite(p.get("bytes"))) is not None
    ]
    if not raw:
        return _empty("no memory timeline")
    raw.sort(key=lambda r: r[0])
    # Phase segments from the full timeline, before downsampling.
    segments: list[tuple[str, float, float]] = []
    for i, (t, _, phase) in enumerate(raw):
        end = raw[i + 1][0] if i + 1 < len(raw) else t
        if phase is None:
            continue
        phase = str(phase)
        if segments and segments[-1][0] == phase:
            segments[-1] = (phase, segments[-1][1], end)
        else:
            segments.append((phase, t, end))
    pts = _downsample([(t, b) for t, b, _ in raw])
    peak_t, peak_b = max(pts, key=lambda p: p[1])
    scale, unit = _bytes_unit(max(peak_b, 1.0))
    with matplotlib.rc_context(_RC):
        fig = _figure(8.6, 3.2)
        ax = fig.add_subplot()
        extra = iter(_EXTRA_PHASE_COLORS * 8)
        phase_colors: dict[str, str] = {}
        span = (raw[-1][0] - raw[0][0]) or 1.0
        for phase, start, end in segments:
            color = phase_colors.setdefault(phase, _PHASE_COLORS.get(phase) or next(extra))
            ax.axvspan(start, max(end, start + span * 0.002), color=color, alpha=0.75, linewidth=0, zorder=0)
            if (end - start) / span > 0.06:
                ax.text(
                    (start + end) / 2,
                    1.0,
                    label_text(phase, 16),
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color=_MUTED,
                )
        xs = [p[0] for p in pts]
        ys = [p[1] / scale for p in pts]
        ax.step(xs, ys, where="post", color=PALETTE[0], linewidth=1.4, zorder=2)
        ax.fill_between(xs, ys, step="post", color=PALETTE[0], alpha=0.12, zorder=1)
        ax.plot([peak_t], [peak_b / scale], marker="o", color=PALETTE[1], markersize=5, zorder=3)
        where = (peak_t - raw[0][0]) / span
        ax.annotate(
            f"peak {peak_b / scale:.3g} {unit}",
            (peak_t, peak_b / scale),
            xytext=(0, 7),
            textcoords="offset points",
            fontsize=8.5,
            fontweight="bold",
            color=_INK,
            ha="left" if where < 0.1 else ("right" if where > 0.9 else "center"),
            va="bottom",
        )
        ax.set_ylim(0, peak_b / scale * 1.22 or 1.0)
        ax.set_xlim(raw[0][0], raw[-1][0] if raw[-1][0] > raw[0][0] else raw[0][0] + 1.0)
        ax.set_xlabel("time (ms)")
        ax.set_ylabel(f"memory in use ({unit})")
        if title:
            ax.set_title(label_text(title, 80), pad=14 if segments else 8)
        return svg_from_figure(fig)
