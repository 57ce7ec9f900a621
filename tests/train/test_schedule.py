import math

import pytest
import torch

from torchkiln.recipe import ScheduleConfig
from torchkiln.train import cycle_position, fit, lr_at


def test_constant_with_warmup():
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_at(s, 1.0, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_closed_form():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, eta_min=0.1)
    total = 110
    for s in range(10, total):
        expected = 0.1 + (1.0 - 0.1) * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
        assert lr_at(s, 1.0, cfg, total) == pytest.approx(expected, abs=1e-12)
    assert lr_at(total + 5, 1.0, cfg, total) == pytest.approx(0.1)


@pytest.mark.parametrize("t_mult", [1, 2, 3])
def test_cosine_restarts_matches_torch(t_mult):
    """Against torch's CosineAnnealingWarmRestarts (stepped once per optimizer step)."""
    cfg = ScheduleConfig(name="cosine_restarts", t0=5, t_mult=t_mult, eta_min=0.01)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=t_mult, eta_min=0.01)
    for s in range(120):
        assert lr_at(s, 0.5, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), s
        opt.step()
        ref.step()


def test_t_mult_lengthens_cycles():
    cfg = ScheduleConfig(name="cosine_restarts", warmup_steps=3, t0=4, t_mult=2)
    # Cycles of 4, 8, 16 steps start after the warm-up at steps 3, 7, 15, 31.
    restarts = [s for s in range(3, 40) if cycle_position(s, cfg)[1] == 0]
    assert restarts == [3, 7, 15, 31]
    assert [cycle_position(s, cfg)[2] for s in restarts] == [4, 8, 16, 32]
    assert all(lr_at(s, 1.0, cfg) == pytest.approx(1.0) for s in restarts)
    # Warm-up then restarts, closed form inside the second cycle:
    assert lr_at(10, 1.0, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 8)))


def test_fit_steps_schedule_per_optimizer_step_not_micro_batch():
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = torch.nn.Linear(4, 2)
    sched = {"name": "cosine_restarts", "warmup_steps": 2, "t0": 3, "t_mult": 2}
    result = fit(
        model, data, batch_size=4, accumulate=4, epochs=2, schedule=sched, progress="off", flops=False
    )
    assert result.steps == 8  # 16 micro-batches per epoch / 4
    cfg = ScheduleConfig(**sched)
    assert result.lrs == pytest.approx([lr_at(s, 1e-3, cfg) for s in range(8)])


def test_skipped_fp16_step_does_not_advance_schedule():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 4), torch.randint(0, 2, (48,)))
    model = torch.nn.Linear(4, 2)
    calls = {"n": 0}

    def poison(grad):  # the second backward overflows: the scaler must skip that step
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    model.weight.register_hook(poison)
    result = fit(
        model,
        data,
        batch_size=8,
        epochs=1,
        precision="fp16",
        schedule={"name": "cosine_restarts", "t0": 2},
        optimizer="sgd",
        lr=0.1,
        progress="off",
        flops=False,
    )
    assert result.skipped_steps == 1
    assert result.steps == 5 and len(result.lrs) == 6
    cfg = ScheduleConfig(name="cosine_restarts", t0=2)
    # attempt 1 (index 1) was skipped: attempt 2 uses the same step index (1) again
    assert result.lrs == pytest.approx([lr_at(s, 0.1, cfg) for s in (0, 1, 1, 2, 3, 4)])
