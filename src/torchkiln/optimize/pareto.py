"""The Pareto front of measured candidates and the choice of the best one within an accuracy budget.

A point is a mapping with ``key``, ``speedup`` (median t_baseline / t_candidate, higher is better),
``throughput_gain`` (mean t_baseline / t_candidate), ``accuracy`` (higher is better), ``size_bytes`` and
``memory_bytes`` (lower is better). The front is over the objective, accuracy and size: a point is on it
when no other point is at least as good on all three and strictly better on one.

>>> pts = [{"key": "a", "speedup": 1.0, "accuracy": 0.9, "size_bytes": 10},
...        {"key": "b", "speedup": 2.0, "accuracy": 0.9, "size_bytes": 10},
...        {"key": "c", "speedup": 3.0, "accuracy": 0.5, "size_bytes": 10}]
>>> [p["key"] for p in pareto_front(pts)]
['b', 'c']
>>> choose(pts, baseline_accuracy=0.9, accuracy_budget=0.01)["key"]
'b'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torchkiln.errors import KilnError

__all__ = ["OBJECTIVES", "OptimizeError", "choose", "objective_value", "pareto_front", "within_budget"]

OBJECTIVES = ("latency", "throughput", "size", "memory")

#: a candidate must beat the baseline by more than this to be chosen over it (timing noise on a shared
#: machine: a 1.01x "win" is a coin toss).
MIN_GAIN = 1.03


class OptimizeError(KilnError, ValueError):
    """An optimize argument that cannot be used, with what would be accepted."""


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def objective_value(point: Mapping[str, Any], objective: str) -> float | None:
    """Higher is better: ``speedup`` (median call time) for latency, ``throughput_gain`` (mean call time,
    falling back to ``speedup`` where a point lacks it) for throughput, ``-size_bytes`` for size and
    ``-memory_bytes`` for memory."""
    if objective not in OBJECTIVES:
        raise OptimizeError(f"objective {objective!r} is not accepted; accepted: {', '.join(OBJECTIVES)}")
    if objective in ("size", "memory"):
        value = _num(point.get(f"{objective}_bytes"))
        return -value if value is not None else None
    if objective == "throughput":
        gain = _num(point.get("throughput_gain"))
        if gain is not None:
            return gain
    return _num(point.get("speedup"))


def _dominates(a: Mapping[str, Any], b: Mapping[str, Any], objective: str) -> bool:
    axes = [
        (objective_value(a, objective), objective_value(b, objective), 1),
        (_num(a.get("accuracy")), _num(b.get("accuracy")), 1),
        (_num(a.get("size_bytes")), _num(b.get("size_bytes")), -1),
    ]
    better = False
    for x, y, sign in axes:
        if x is None or y is None:
            continue  # an axis one of them lacks does not decide
        if sign * (x - y) < 0:
            return False
        if sign * (x - y) > 0:
            better = True
    return better


def pareto_front(points: Sequence[Mapping[str, Any]], objective: str = "latency") -> list[Mapping[str, Any]]:
    """The points no other point dominates (the objective and accuracy up, size down), in input order."""
    usable = [
        p for p in points if objective_value(p, objective) is not None and _num(p.get("accuracy")) is not None
    ]
    return [p for p in usable if not any(_dominates(q, p, objective) for q in usable if q is not p)]


def within_budget(point: Mapping[str, Any], baseline_accuracy: float, accuracy_budget: float) -> bool:
    """Whether ``point``'s accuracy is at most ``accuracy_budget`` below the baseline's (absolute)."""
    acc = _num(point.get("accuracy"))
    return acc is not None and acc >= baseline_accuracy - accuracy_budget - 1e-12


def choose(
    points: Sequence[Mapping[str, Any]],
    *,
    baseline_accuracy: float,
    accuracy_budget: float,
    objective: str = "latency",
    baseline_key: str | None = None,
    min_gain: float = MIN_GAIN,
) -> Mapping[str, Any] | None:
    """The within-budget point that is best on ``objective`` (ties: higher accuracy, then smaller), or
    None when no candidate beats the baseline (more than ``min_gain`` times faster for latency and
    throughput; a smaller artifact for size; ``min_gain`` times less memory for memory, whose figure is
    measured, not counted). A smaller or leaner point that is clearly slower than the baseline is not a
    win. An over-budget point is never chosen, however fast.
    """
    if accuracy_budget < 0:
        raise OptimizeError(
            f"accuracy_budget must be >= 0 (an absolute drop, 0.01 = 1 point), got {accuracy_budget}"
        )
    base = next((p for p in points if p.get("key") == baseline_key), None)
    best: Mapping[str, Any] | None = None
    best_score: tuple[float, float, float] | None = None
    for p in points:
        if p.get("key") == baseline_key or not within_budget(p, baseline_accuracy, accuracy_budget):
            continue
        value = objective_value(p, objective)
        if value is None:
            continue
        if objective in ("size", "memory"):
            base_value = _num(base.get(f"{objective}_bytes")) if base else None
            need = 1.0 if objective == "size" else min_gain
            if base_value is not None and -value * need >= base_value:
                continue
            speed = _num(p.get("speedup")) or 0.0
            if speed < 1.0 / min_gain:  # smaller but clearly slower than the baseline: not a win
                continue
        elif value < min_gain:
            continue
        score = (value, _num(p.get("accuracy")) or 0.0, -(_num(p.get("size_bytes")) or 0.0))
        if best_score is None or score > best_score:
            best, best_score = p, score
    return best
