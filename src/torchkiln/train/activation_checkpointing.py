"""Activation checkpointing by policy: recompute chosen blocks' activations during backward.

Non-reentrant (``use_reentrant=False``): works with inputs that do not require grad, with keyword
arguments and with torch.compile. The blocks' ``forward`` is wrapped in place, so parameter names and
the ``state_dict`` keys do not change (no ``_checkpoint_wrapped_module.`` prefixes).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(4)])
>>> [name for name, _ in apply_activation_checkpointing(net, every=2)]
['0', '2']
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import torch.utils.checkpoint
from torch import nn

_MARK = "_kiln_checkpointed_forward"


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks: children of the ModuleList/Sequential that holds the most
    children of one class (at least two). Transformer layers, ResNet stages' blocks, MLP layers."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if len(children) < 2:
            continue
        cls, count = Counter(type(c) for _, c in children).most_common(1)[0]
        if count < 2 or count <= len(best):
            continue
        # Leaves such as ReLU or Linear alone are poor blocks: prefer containers with parameters inside.
        if not any(True for _ in next(c for _, c in children if type(c) is cls).children()):
            continue
        prefix = f"{name}." if name else ""
        best = [(prefix + n, c) for n, c in children if type(c) is cls]
    return best


def _blocks_by_type(model: nn.Module, class_names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    wanted = set(class_names)
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ in wanted and n]
    missing = wanted - {type(m).__name__ for _, m in found}
    if missing:
        have = sorted({type(m).__name__ for _, m in model.named_modules()})
        raise ValueError(
            f"activation_checkpointing.modules: no module of class {sorted(missing)} in "
            f"{type(model).__name__}; classes present: {', '.join(have)}"
        )
    # Do not nest: drop a module that lives inside another selected one.
    names = [n for n, _ in found]
    return [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o in names)]


def _checkpointed_forward(module: nn.Module, *args, **kwargs):
    # A module-level function bound with functools.partial (not a bound method) so that deepcopy,
    # pickling and EMA copies of the model carry the wrapping over to the copy correctly.
    return torch.utils.checkpoint.checkpoint(
        type(module).forward, module, *args, use_reentrant=False, **kwargs
    )


def apply_activation_checkpointing(
    model: nn.Module, *, modules: Sequence[str] = (), every: int = 1
) -> list[tuple[str, nn.Module]]:
    """Checkpoint every ``every``-th block of ``model``; return the ``(name, module)`` pairs wrapped.

    ``modules``: class names of the blocks (default: auto-detected repeated blocks).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    blocks = _blocks_by_type(model, modules) if modules else find_blocks(model)
    if not blocks:
        raise ValueError(
            f"activation checkpointing found no repeated blocks in {type(model).__name__}; "
            "name the block classes with activation_checkpointing.modules = ['Block']"
        )
    chosen = blocks[::every]
    for _, block in chosen:
        if block.__dict__.get(_MARK):
            continue  # already wrapped
        if "forward" in block.__dict__:
            raise ValueError(
                f"block {type(block).__name__} already has a per-instance forward; cannot wrap it"
            )
        block.forward = functools.partial(_checkpointed_forward, block)
        block.__dict__[_MARK] = True
    return chosen


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Undo :func:`apply_activation_checkpointing`; return how many blocks were unwrapped."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop(_MARK, False):
            del module.__dict__["forward"]
            count += 1
    return count
