"""Model splitting for models that do not fit one device: consecutive blocks on a list of devices.

The simple (naive) pipeline from the usual snippet, done so that :func:`~torchkiln.train.fit` can train
it: the model's repeated blocks (:func:`~torchkiln.train.find_blocks`) are cut into ``len(devices)``
consecutive groups of about equal parameter count; the modules before the first block go with the first
group and those after the last block with the last group; a module whose parameter is tied to one on an
earlier device (a tied LM head) stays with it. A forward pre-hook moves each module's inputs to its
device, the output comes back on the last device, and parameter names (``state_dict`` keys) do not
change. Only one device computes at a time (no micro-batch overlap): it buys memory, not speed.

>>> import torch, torchkiln as tk
>>> model = tk.create_model("gpt-tiny", vocab_size=17, seq_len=8, n_layer=4, n_head=2, n_embd=16)
>>> plan = split_model(model, ["cpu", "cpu"])
>>> [plan.stage_of[f"blocks.{i}"] for i in range(4)], plan.stage_of["tok_emb"], plan.stage_of["ln_f"]
([0, 0, 1, 1], 0, 1)
>>> plan.stage_of["lm_head"]   # tied to tok_emb's weight: on tok_emb's device
0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchkiln.train.activation_checkpointing import find_blocks

SPLIT_ATTR = "_kiln_split"


@dataclass
class SplitPlan:
    """Where every module with its own parameters or buffers went (``stage_of[name]`` indexes
    ``devices``)."""

    devices: list[torch.device]
    stage_of: dict[str, int] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list, repr=False)

    @property
    def first_device(self) -> torch.device:
        return self.devices[0]

    @property
    def last_device(self) -> torch.device:
        return self.devices[-1]


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _balanced_cuts(sizes: list[int], stages: int) -> list[int]:
    """Stage of each block: consecutive groups of about equal total size, no stage empty.

    >>> _balanced_cuts([1, 1, 1, 1], 2), _balanced_cuts([5, 1, 1, 1], 2), _balanced_cuts([1, 1, 1], 3)
    ([0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 2])
    """
    n, total = len(sizes), sum(max(s, 1) for s in sizes)
    out, acc, prev = [], 0, -1
    for i, size in enumerate(sizes):
        ideal = int((acc + max(size, 1) / 2) * stages / total)
        lo = max(prev, stages - (n - i), 0)  # the blocks left must still reach the last stage
        hi = min(prev + 1, stages - 1)  # no stage skipped
        prev = min(max(ideal, lo), hi)
        out.append(prev)
        acc += max(size, 1)
    return out


def split_model(
    model: nn.Module, devices: Sequence[str | torch.device], *, blocks: Sequence[str] | None = None
) -> SplitPlan:
    """Place ``model``'s blocks on ``devices`` (in place) and return the plan; see the module docstring.

    ``blocks``: names of the modules to distribute (default: the repeated blocks ``find_blocks``
    detects). Call before :func:`~torchkiln.train.fit` (which then leaves the placement alone and feeds
    the inputs to the first device).
    """
    devs = [torch.device(d) for d in devices]
    if not devs:
        raise ValueError("split_model needs at least one device")
    if getattr(model, SPLIT_ATTR, None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already split across {getattr(model, SPLIT_ATTR).devices}"
        )
    named = dict(model.named_modules())
    if blocks is None:
        block_names = [n for n, _ in find_blocks(model)]
        if not block_names:
            raise ValueError(
                f"no repeated blocks found in {type(model).__name__} to split across devices; "
                "pass blocks=[module names] (consecutive modules of the forward pass)"
            )
    else:
        missing = [n for n in blocks if n not in named]
        if missing:
            raise ValueError(f"blocks {missing} are not modules of {type(model).__name__}")
        block_names = list(blocks)
    if len(block_names) < len(devs):
        raise ValueError(f"{len(block_names)} blocks cannot fill {len(devs)} devices; use fewer devices")
    sizes = [sum(p.numel() for p in named[n].parameters()) for n in block_names]
    block_stage = dict(zip(block_names, _balanced_cuts(sizes, len(devs)), strict=True))

    # Every module with its own tensors: a block's stage, or that of the latest block before it.
    plan = SplitPlan(devices=devs)
    current = 0
    inside: str | None = None
    for name, module in model.named_modules():
        if name in block_stage:
            inside, current = name, block_stage[name]
            plan.stage_of[name] = current
            continue
        if inside is not None and name.startswith(inside + "."):
            continue  # moved with its block
        inside = None
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            plan.stage_of[name] = current
    # Tied parameters live on the earliest stage that uses them.
    first_use: dict[int, int] = {}
    for name, stage in plan.stage_of.items():
        for p in named[name].parameters(recurse=name in block_stage):
            first_use[id(p)] = min(first_use.get(id(p), stage), stage)
    for name in list(plan.stage_of):
        if name in block_stage:
            continue
        tied = [first_use[id(p)] for p in named[name].parameters(recurse=False)]
        if tied:
            plan.stage_of[name] = min(tied)
    for name in block_names:
        tied = {first_use[id(p)] for p in named[name].parameters()} - {block_stage[name]}
        if tied:
            raise ValueError(f"block {name} shares parameters with a module on another stage; cannot split")

    # Move the tensors (p.data keeps each Parameter object, so ties and optimizers stay intact).
    with torch.no_grad():
        for name, stage in plan.stage_of.items():
            module, device = named[name], devs[stage]
            recurse = name in block_stage
            for p in module.parameters(recurse=recurse):
                p.data = p.data.to(device)
            for sub in module.modules() if recurse else [module]:
                for key, buf in list(sub._buffers.items()):
                    if buf is not None:
                        sub._buffers[key] = buf.to(device)

    def mover(device: torch.device):  # noqa: ANN202
        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _to(args, device), _to(kwargs, device)

        return pre_hook

    for name, stage in plan.stage_of.items():
        plan.handles.append(named[name].register_forward_pre_hook(mover(devs[stage]), with_kwargs=True))
    last = devs[-1]
    plan.handles.append(model.register_forward_hook(lambda _m, _a, out: _to(out, last)))
    setattr(model, SPLIT_ATTR, plan)
    return plan


def split_plan(model: nn.Module) -> SplitPlan | None:
    """The :class:`SplitPlan` of a model :func:`split_model` placed, else None."""
    return getattr(model, SPLIT_ATTR, None)
