"""Learning-rate schedules as pure functions of the optimizer-step count.

The rate for optimizer step ``s`` (0-based: the number of optimizer steps already taken) depends on
``s`` alone, so resuming from a checkpoint reproduces it exactly and there is no scheduler state to
save. Schedules advance per optimizer step, never per micro-batch.

>>> from torchkiln.recipe import ScheduleConfig
>>> cfg = ScheduleConfig(name="cosine_restarts", warmup_steps=0, t0=10, t_mult=2)
>>> [round(lr_at(s, 1.0, cfg), 3) for s in (0, 10, 30)]   # each cycle restarts at the base rate
[1.0, 1.0, 1.0]
>>> cycle_position(25, cfg)   # second cycle (length 20) started at step 10
(1, 15, 20)
"""

from __future__ import annotations

import math

from torchkiln.recipe import ScheduleConfig


def _warmup_factor(step: int, warmup: int) -> float:
    # Step s of the warm-up uses (s + 1) / warmup, so the first step is not wasted at lr = 0.
    return (step + 1) / warmup


def cycle_position(step: int, cfg: ScheduleConfig) -> tuple[int, int, int]:
    """For ``cosine_restarts``: ``(cycle index, steps into the cycle, cycle length)`` after warm-up.

    Cycle ``i`` lasts ``t0 * t_mult**i`` steps (T_mult lengthens every cycle).
    """
    t = step - cfg.warmup_steps
    if t < 0:
        raise ValueError("step is inside the warm-up")
    if cfg.t_mult == 1:
        return t // cfg.t0, t % cfg.t0, cfg.t0
    # Integer walk over cycles; the number of cycles grows logarithmically with t when t_mult >= 2.
    i, length = 0, cfg.t0
    while t >= length:
        t -= length
        i += 1
        length *= cfg.t_mult
    return i, t, length


def lr_at(step: int, base_lr: float, cfg: ScheduleConfig, total_steps: int | None = None) -> float:
    """Learning rate of optimizer step ``step`` for a parameter group whose base rate is ``base_lr``.

    ``total_steps`` (optimizer steps in the whole run) is needed by ``cosine``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return base_lr * _warmup_factor(step, cfg.warmup_steps)
    if cfg.name == "constant":
        return base_lr
    eta_min = min(cfg.eta_min, base_lr)
    if cfg.name == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs total_steps")
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "cosine_restarts":
        _, t_cur, t_i = cycle_position(step, cfg)
        return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * t_cur / t_i))
    raise ValueError(f"unknown schedule {cfg.name!r}")  # pragma: no cover - guarded by the schema


def set_lr(optimizer, step: int, cfg: ScheduleConfig, total_steps: int | None) -> float:
    """Set every group's ``lr`` from its ``initial_lr`` for ``step``; return the first group's rate."""
    first = None
    for group in optimizer.param_groups:
        base = group.setdefault("initial_lr", group["lr"])
        group["lr"] = lr_at(step, base, cfg, total_steps)
        if first is None:
            first = group["lr"]
    return float(first if first is not None else 0.0)
