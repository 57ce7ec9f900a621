"""FLOP counting, the training-step helper, MFU and the cached GEMM peak."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure import FlopCount, count_flops, flops, mfu, peak_flops, training_step_flops
from torchkiln.measure.flops import UnsupportedDtypeError, cached_peak_flops, peak_cache_path


def test_linear_flops_are_two_b_in_out():
    lin = nn.Linear(8, 4)
    count = count_flops(lin, torch.randn(3, 8))
    assert isinstance(count, FlopCount)
    assert count.total == 2 * 3 * 8 * 4
    assert count.by_op == {"aten.addmm": 2 * 3 * 8 * 4}


def test_matmul_flops_exact():
    a, b = torch.randn(5, 7), torch.randn(7, 11)
    assert count_flops(torch.matmul, a, b).total == 2 * 5 * 7 * 11
    batched = count_flops(torch.bmm, torch.randn(2, 5, 7), torch.randn(2, 7, 11))
    assert batched.total == 2 * 2 * 5 * 7 * 11
    assert batched.uncounted_ops == []


def test_uncounted_ops_list_softmax_but_not_views():
    def fn(x):
        return torch.softmax(x.view(4, 6).t().contiguous(), dim=-1) + 1

    count = count_flops(fn, torch.randn(24))
    assert count.total == 0
    assert "aten._softmax" in count.uncounted_ops
    assert "aten.add" in count.uncounted_ops
    for free in ("aten.view", "aten.t", "aten.clone", "aten.detach", "aten._to_copy"):
        assert free not in count.uncounted_ops


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))


def test_training_step_flops_backward_is_twice_forward():
    model = _mlp().train()
    x = torch.randn(6, 8)
    f1, f2 = 2 * 6 * 8 * 16, 2 * 6 * 16 * 4
    assert count_flops(model, x).total == f1 + f2
    # backward: weight grads for both layers, input grad only for the second (x needs no grad)
    assert training_step_flops(model, x).total == (f1 + f2) + f1 + 2 * f2
    # with an input that needs grad, the step is exactly 3x the forward
    assert training_step_flops(model, x.clone().requires_grad_()).total == 3 * (f1 + f2)


def test_training_step_flops_leaves_model_state_unchanged():
    model = _mlp().train()
    x = torch.randn(6, 8)
    model(x).sum().backward()  # existing grads that must survive
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    bn = model[1]
    running_mean = bn.running_mean
    rng = torch.get_rng_state()

    count = training_step_flops(model, x, loss_fn=lambda out: out.pow(2).mean())

    assert count.total > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for p, g, v in zip(model.parameters(), grads, grad_values, strict=True):
        assert p.grad is g
        assert torch.equal(p.grad, v)
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert bn.running_mean is running_mean
    assert model.training


def test_training_step_flops_none_grads_stay_none_and_inputs_forms():
    class KwModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, scale=1.0):
            return {"loss": self.lin(x).sum() * scale}

    model = KwModel()
    x = torch.randn(3, 4)
    by_kwargs = training_step_flops(model, {"x": x, "scale": 2.0})
    by_tuple = training_step_flops(model, (x,))
    assert by_kwargs.total == by_tuple.total == 2 * 3 * 4 * 2 * 2  # forward addmm + weight-grad mm
    assert all(p.grad is None for p in model.parameters())


def test_training_step_flops_rejects_output_without_loss():
    model = nn.Linear(4, 2)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return [self.inner(x)]

    with pytest.raises(KilnError, match="loss_fn"):
        training_step_flops(Wrap(), torch.randn(2, 4))


def test_mfu():
    assert mfu(50.0, 200.0) == 0.25
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHKILN_CACHE", str(tmp_path))
    return tmp_path


def test_peak_flops_real_measurement_small(cache_dir, monkeypatch):
    monkeypatch.setattr(flops, "_CPU_SIZES", (128, 256))
    monkeypatch.setattr(flops, "_BUDGET_PER_SIZE_S", 0.05)
    value = peak_flops(torch.float32, threads=1)
    assert value > 0
    data = json.loads((cache_dir / "peak_flops.json").read_text())
    (entry,) = data.values()
    assert entry["flops_per_s"] == value
    assert entry["threads"] == 1 and entry["dtype"] == "float32" and entry["gemm_size"] in (128, 256)


def test_peak_flops_second_call_reads_cache(cache_dir, monkeypatch):
    calls = []

    def fake_measure(dtype, device):
        calls.append((dtype, str(device)))
        return 1.5e11, 1024

    monkeypatch.setattr(flops, "_measure_gemm_peak", fake_measure)
    assert cached_peak_flops(torch.bfloat16, threads=1) is None
    assert peak_flops(torch.bfloat16, threads=1) == 1.5e11
    assert peak_flops(torch.bfloat16, threads=1) == 1.5e11
    assert len(calls) == 1
    # a different key (threads or dtype) is measured separately
    peak_flops(torch.bfloat16, threads=2)
    peak_flops(torch.float32, threads=1)
    assert len(calls) == 3
    # refresh re-measures
    peak_flops(torch.bfloat16, threads=1, refresh=True)
    assert len(calls) == 4
    assert cached_peak_flops(torch.bfloat16, threads=1) == 1.5e11
    assert peak_cache_path() == cache_dir / "peak_flops.json"
    assert len(json.loads(peak_cache_path().read_text())) == 3


def test_peak_flops_cache_written_atomically(cache_dir, monkeypatch):
    monkeypatch.setattr(flops, "_measure_gemm_peak", lambda dtype, device: (2.0e11, 2048))
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):
        replaced.append((str(src), str(dst)))
        assert os.path.dirname(str(src)) == str(cache_dir)  # temp file next to the target
        return real_replace(src, dst)

    monkeypatch.setattr(flops.os, "replace", spy_replace)
    (cache_dir / "peak_flops.json").write_text("{not json")  # a corrupt cache is ignored, then rewritten
    peak_flops(torch.float32, threads=1)
    assert len(replaced) == 1 and replaced[0][1] == str(cache_dir / "peak_flops.json")
    assert sorted(p.name for p in cache_dir.iterdir()) == ["peak_flops.json"]  # no temp file left
    assert list(json.loads((cache_dir / "peak_flops.json").read_text()).values())[0]["flops_per_s"] == 2.0e11


def test_peak_flops_rejects_unknown_dtype(cache_dir):
    with pytest.raises(UnsupportedDtypeError, match="float32"):
        peak_flops(torch.int8)


def test_peak_flops_threads_restored(cache_dir, monkeypatch):
    seen = []

    def fake_measure(dtype, device):
        seen.append(torch.get_num_threads())
        return 1.0, 1

    monkeypatch.setattr(flops, "_measure_gemm_peak", fake_measure)
    before = torch.get_num_threads()
    peak_flops(torch.float32, threads=1)
    assert seen == [1]
    assert torch.get_num_threads() == before
