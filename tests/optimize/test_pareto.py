"""The Pareto front and the choice under an accuracy budget, on hand-made points."""

import pytest

from torchkiln.optimize import OptimizeError, choose, pareto_front


def _p(key, speedup, accuracy, size=100):
    return {"key": key, "speedup": speedup, "accuracy": accuracy, "size_bytes": size}


POINTS = [
    _p("eager", 1.0, 0.95, 100),
    _p("onnx", 3.0, 0.95, 110),
    _p("int8", 4.0, 0.945, 30),
    _p("prune", 6.0, 0.90, 20),  # fastest and smallest, but 5 points down
    _p("slow-big", 0.9, 0.94, 200),  # dominated by eager
]


def test_front_keeps_exactly_the_undominated_points():
    assert [p["key"] for p in pareto_front(POINTS)] == ["eager", "onnx", "int8", "prune"]


def test_front_with_equal_points_keeps_both():
    pts = [_p("a", 2.0, 0.9), _p("b", 2.0, 0.9), _p("c", 1.0, 0.8)]
    assert [p["key"] for p in pareto_front(pts)] == ["a", "b"]


def test_over_budget_is_never_chosen_even_if_fastest():
    chosen = choose(POINTS, baseline_accuracy=0.95, accuracy_budget=0.01, baseline_key="eager")
    assert chosen["key"] == "int8"
    tight = choose(POINTS, baseline_accuracy=0.95, accuracy_budget=0.0, baseline_key="eager")
    assert tight["key"] == "onnx"
    loose = choose(POINTS, baseline_accuracy=0.95, accuracy_budget=0.06, baseline_key="eager")
    assert loose["key"] == "prune"


def test_size_objective_prefers_the_smallest_within_budget():
    chosen = choose(
        POINTS, baseline_accuracy=0.95, accuracy_budget=0.01, objective="size", baseline_key="eager"
    )
    assert chosen["key"] == "int8"


def test_nothing_beats_the_baseline_returns_none():
    pts = [_p("eager", 1.0, 0.9), _p("noise", 1.01, 0.9), _p("worse", 5.0, 0.5)]
    assert choose(pts, baseline_accuracy=0.9, accuracy_budget=0.01, baseline_key="eager") is None


def test_bad_arguments_say_what_is_accepted():
    with pytest.raises(OptimizeError, match="accepted: latency, throughput, size"):
        choose(POINTS, baseline_accuracy=0.9, accuracy_budget=0.01, objective="speed")
    with pytest.raises(OptimizeError, match="accuracy_budget"):
        choose(POINTS, baseline_accuracy=0.9, accuracy_budget=-1)
