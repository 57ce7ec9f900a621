"""``memory_analysis`` and ``activation_bytes_by_module``: phases with exact CPU figures on a known MLP,
activation bytes per module that add up to ``saved_tensor_bytes``, and a model left as found."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure import (
    MemoryReport,
    activation_bytes_by_module,
    memory_analysis,
    saved_tensor_bytes,
)
from torchkiln.zoo import create_model

SCHEMA_KEYS = {"model", "batch_size", "device", "source", "phases", "activation_bytes_by_module", "timeline"}
PHASE_KEYS = {"phase", "allocated_bytes", "peak_bytes", "delta_bytes", "rss_bytes"}


def _mlp() -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, torch.randn(64, 32), param_bytes


def _square_loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def test_phases_of_a_known_mlp_are_exact_on_cpu():
    model, x, param_bytes = _mlp()
    rep = memory_analysis(model, x, _square_loss)
    assert isinstance(rep, MemoryReport)
    assert [p["phase"] for p in rep.phases] == ["initial", "forward", "backward", "optimizer"]
    assert rep.source == "profiler memory events + RSS (psutil)" and rep.device == "cpu"
    initial, forward, backward, optimizer = rep.phases
    # initial: parameters + the batch, counted from tensor sizes
    assert initial["allocated_bytes"] == param_bytes + x.numel() * 4 == rep.initial_bytes
    # forward keeps the ReLU output (saved), the logits and the loss alive
    assert forward["delta_bytes"] == 64 * 256 * 4 + 64 * 10 * 4 + 4
    assert forward["peak_bytes"] >= forward["allocated_bytes"] > initial["allocated_bytes"]
    # backward frees the activations and allocates one gradient per parameter
    assert backward["allocated_bytes"] - initial["allocated_bytes"] == param_bytes + 4  # + the loss
    assert backward["peak_bytes"] > backward["allocated_bytes"]
    # SGD(lr=0), the default, keeps no state
    assert optimizer["delta_bytes"] == 0 and "none given" in rep.optimizer
    assert rep.peak_bytes == max(p["peak_bytes"] for p in rep.phases) >= rep.final_bytes
    for p in rep.phases:
        assert PHASE_KEYS <= set(p) and p["rss_bytes"] > 0


def test_adam_state_shows_in_the_optimizer_phase_and_is_restored():
    model, x, param_bytes = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = memory_analysis(model, x, _square_loss, opt)
    delta = rep.phase("optimizer")["delta_bytes"]
    assert 2 * param_bytes <= delta <= 2 * param_bytes + 1024  # exp_avg, exp_avg_sq (+ step counters)
    assert rep.optimizer == "Adam"
    assert not opt.state  # the first step's state was undone
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet-tiny", "gpt-tiny"])
def test_activation_bytes_by_module_sum_to_saved_tensor_bytes(name):
    torch.manual_seed(0)
    if name == "gpt-tiny":
        model = create_model("gpt-tiny", n_layer=2, n_embd=32, n_head=2, seq_len=16, vocab_size=64)
        (x,) = model.example_inputs(2)
        targets = torch.randint(0, 64, (2, 16))
    else:
        model = create_model("resnet-tiny", widths=(8, 16), blocks_per_stage=(1, 1))
        (x,) = model.example_inputs(4)
        targets = torch.randint(0, 10, (4,))

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))

    reference = copy.deepcopy(model)
    whole = saved_tensor_bytes(lambda: loss_fn(reference(x)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = memory_analysis(model, x, loss_fn)

    rows = rep.activations.by_module
    assert sum(r["saved_bytes"] for r in rows) == rep.activations.bytes == whole.bytes
    assert rep.activations.count == whole.count
    real = {n or "(root)": type(m).__name__ for n, m in model.named_modules()}
    for r in rows:
        assert r["name"] == "(outside modules)" or real[r["name"]] == r["type"]
        assert r["total_saved_bytes"] >= r["saved_bytes"] >= 0
    by_name = {r["name"]: r for r in rows}
    assert (
        by_name["(root)"]["total_saved_bytes"] + by_name.get("(outside modules)", {}).get("saved_bytes", 0)
        == rep.activations.bytes
    )
    block = "blocks.0"
    children = [r for n, r in by_name.items() if n.startswith(block + ".")]
    assert by_name[block]["total_saved_bytes"] == by_name[block]["saved_bytes"] + sum(
        r["saved_bytes"] for r in children
    )
    # forward grows memory on a model with activations; the model is left as found
    assert rep.phase("forward")["delta_bytes"] > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BatchNorm stats too
    assert model.training


def test_results_follow_the_schema():
    model, x, _ = _mlp()
    results = memory_analysis(model, x, _square_loss, model_name="mlp").to_results(batch_size=64)
    assert SCHEMA_KEYS <= set(results)
    assert results["model"] == "mlp" and results["batch_size"] == 64 and results["device"] == "cpu"
    assert results["activation_bytes"] == sum(r["saved_bytes"] for r in results["activation_bytes_by_module"])
    timeline = results["timeline"]
    assert timeline[0] == {"t_ms": 0.0, "bytes": results["initial_bytes"], "phase": "initial"}
    assert {p["phase"] for p in timeline} == {"initial", "forward", "backward", "optimizer"}
    assert max(p["bytes"] for p in timeline) == results["peak_bytes"]
    assert set(results["sources"]) >= {"initial", "allocated", "peak", "rss", "activations"}
    json.dumps(results, allow_nan=False)


def test_activations_attributed_to_the_innermost_module():
    net = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(2, 8)
    stats = activation_bytes_by_module(net, lambda: net(x).sum())
    rows = {r["name"]: r for r in stats.by_module}
    assert rows["0"]["saved_bytes"] == 2 * 8 * 4  # the batch, saved by the first Linear
    assert rows["1.0"]["saved_bytes"] == 2 * 16 * 4  # the ReLU output
    assert "1.1" not in rows  # the second Linear saves the same ReLU output: counted once, to the ReLU
    assert rows["1"]["saved_bytes"] == 0 and rows["1"]["total_saved_bytes"] == 2 * 16 * 4
    assert rows["(root)"]["total_saved_bytes"] == stats.bytes
    stats.result.backward()  # the graph still trains


def test_needs_a_loss():
    model, x, _ = _mlp()
    with pytest.raises(KilnError, match="loss_fn"):
        memory_analysis(model, x)
