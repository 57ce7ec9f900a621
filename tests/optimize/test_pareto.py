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
    with pytest.raises(OptimizeError, match="accepted: latency, throughput, size, memory"):
        choose(POINTS, baseline_accuracy=0.9, accuracy_budget=0.01, objective="speed")
    with pytest.raises(OptimizeError, match="accuracy_budget"):
        choose(POINTS, baseline_accuracy=0.9, accuracy_budget=-1)


def _q(key, speedup, gain, memory, accuracy=0.95, size=100):
    return {
        "key": key,
        "speedup": speedup,
        "throughput_gain": gain,
        "memory_bytes": memory,
        "accuracy": accuracy,
        "size_bytes": size,
    }


# "steady" has the best median call but stalls now and then; "even" is a little slower per median call
# and sustains more; "lean" holds the least memory; "leaner-slow" less still but is clearly slower.
RANKED = [
    _q("eager", 1.0, 1.0, 1000),
    _q("steady", 3.0, 2.0, 900),
    _q("even", 2.6, 2.5, 800),
    _q("lean", 1.5, 1.5, 300),
    _q("leaner-slow", 0.5, 0.5, 100),
]


def test_latency_and_throughput_rank_on_different_figures():
    kw = {"baseline_accuracy": 0.95, "accuracy_budget": 0.01, "baseline_key": "eager"}
    assert choose(RANKED, objective="latency", **kw)["key"] == "steady"
    assert choose(RANKED, objective="throughput", **kw)["key"] == "even"


def test_throughput_falls_back_to_speedup_for_points_without_a_gain():
    pts = [_p("eager", 1.0, 0.95), _p("fast", 2.0, 0.95)]
    assert (
        choose(
            pts, baseline_accuracy=0.95, accuracy_budget=0.01, objective="throughput", baseline_key="eager"
        )["key"]
        == "fast"
    )


def test_memory_objective_picks_the_leanest_that_is_not_clearly_slower():
    chosen = choose(
        RANKED, baseline_accuracy=0.95, accuracy_budget=0.01, objective="memory", baseline_key="eager"
    )
    assert chosen["key"] == "lean"


def test_memory_needs_a_real_saving_over_the_baseline():
    pts = [_q("eager", 1.0, 1.0, 1000), _q("same", 2.0, 2.0, 990)]  # 1% less is measurement noise
    assert (
        choose(pts, baseline_accuracy=0.95, accuracy_budget=0.01, objective="memory", baseline_key="eager")
        is None
    )


def test_front_follows_the_objective():
    latency = [p["key"] for p in pareto_front(RANKED, "latency")]
    memory = [p["key"] for p in pareto_front(RANKED, "memory")]
    assert "leaner-slow" not in latency and "steady" in latency
    assert "leaner-slow" in memory and "eager" not in memory


def test_generated_candidates_follow_the_architecture():
    import torch

    import torchkiln as tk
    from torchkiln.optimize import generate_candidates

    def keys(model, x):
        return [c.key for c in generate_candidates(model, x, prune_ratios=(0.5,))]

    mlp = keys(tk.create_model("mlp", hidden=(16,)), torch.randn(2, 64))
    cnn = keys(tk.create_model("resnet-tiny"), torch.randn(2, 1, 8, 8))
    gpt = keys(
        tk.create_model("gpt-tiny", vocab_size=64, seq_len=16, n_layer=1, n_embd=32),
        torch.zeros(2, 16).long(),
    )
    assert mlp[0] == cnn[0] == gpt[0] == "eager"  # the baseline first
    for ks in (mlp, gpt):
        assert "int8-weight-only+compile" in ks and "int8-dynamic+compile" in ks
        assert not any("channels_last" in k or "int8-static" in k for k in ks)
    assert {"eager+channels_last", "int8-static+eager", "int8-static+compile"} <= set(cnn)
    assert "prune0.5+distill+int8-static+compile" in cnn
    assert len(set(mlp)) == len(mlp) and len(set(cnn)) == len(cnn)
