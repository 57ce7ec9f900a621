"""Optimizers with sensible parameter groups and the fastest implementation torch offers.

By default norms and biases get no weight decay (decaying them hurts and is a common snippet bug).
``implementation='auto'`` uses the fused kernel where this torch supports it for the optimizer and
device, else foreach.

>>> import torch
>>> from torchkiln.recipe import OptimizerConfig
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
>>> opt = build_optimizer(m, OptimizerConfig(name="adamw"), lr=1e-3, weight_decay=0.1)
>>> [g["weight_decay"] for g in opt.param_groups]
[0.1, 0.0]
"""

from __future__ import annotations

import torch
from torch import nn

from torchkiln.recipe import OptimizerConfig

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
# torch >= 2.4 has fused CPU kernels for these; CUDA has had them longer.
_FUSED = {"adam", "adamw", "sgd"}


def split_decay_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)``: biases, 1-d parameters and every parameter of a norm layer go to no_decay."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith(
            ("norm", "norm2d")
        )
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if is_norm or name.endswith("bias") or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay


def _implementation_kwargs(cfg: OptimizerConfig, params: list[nn.Parameter]) -> dict[str, bool]:
    impl = cfg.implementation
    devices = {p.device.type for p in params}
    fusable = cfg.name in _FUSED and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    if impl == "auto":
        impl = "fused" if fusable else "foreach"
    if impl == "fused":
        if not fusable:
            raise ValueError(
                f"optimizer.implementation='fused' is not available for {cfg.name} on {sorted(devices)}; "
                "use 'auto' or 'foreach'"
            )
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    return {"foreach": False}


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, *, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg`` names for ``model``'s trainable parameters."""
    if cfg.decay_norm_and_bias or weight_decay == 0.0:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:
        decay, no_decay = split_decay_params(model)
        groups = [
            g
            for g in (
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]
    all_params = [p for g in groups for p in g["params"]]
    if not all_params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    impl = _implementation_kwargs(cfg, all_params)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **impl)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, **impl)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **impl)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **impl)
    raise ValueError(f"unknown optimizer {cfg.name!r}")  # pragma: no cover - guarded by the schema
