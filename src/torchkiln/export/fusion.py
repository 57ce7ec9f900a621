"""Fold BatchNorm into the convolution or linear layer that feeds it, for inference (eval mode).

``y = bn(conv(x))`` becomes ``y = conv'(x)`` with ``W' = W * gamma / sqrt(var + eps)`` and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``: one pass over the activations instead of two, and
the BatchNorm module is replaced by ``nn.Identity``. The result is checked against the original.

Which conv feeds which BatchNorm is read from one forward pass on example inputs, not from module order:
a BatchNorm is folded only when its input is exactly the output of one conv/linear call, that output
has no other use, and both modules run once per forward. Any model works (residual blocks, Python
control flow); a model without such pairs is returned as it is.

What is *not* done here: fusing the ReLU after the conv into the same kernel. Eager PyTorch has no
fused conv+ReLU kernel to call (``torch.ao.nn.intrinsic.ConvReLU2d`` still runs two ops); the backends
do it themselves on the folded graph -- TorchScript's ``optimize_for_inference`` (oneDNN conv with a
fused ReLU post-op), ONNX Runtime's ``ConvActivationFusion`` at its basic level, and inductor (AOTI).

>>> import torchkiln as tk
>>> model = tk.create_model("resnet-tiny").eval()
>>> fused = fuse(model)
>>> any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
False
>>> x = model.example_inputs(4)
>>> bool(torch.allclose(fused(*x), model(*x), atol=1e-5))
True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from torchkiln.export.spec import ExportError

__all__ = ["FuseResult", "find_bn_folds", "fuse", "fuse_with_report"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FuseVerificationError(ExportError):
    """The fused model's outputs differ from the original's by more than the tolerance."""


@dataclass
class FuseResult:
    """The fused model, the folded ``(producer, batchnorm)`` module names, and the largest absolute
    difference from the original's outputs on the example inputs (None when nothing was folded)."""

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    max_abs_error: float | None = None


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


def _example_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is not None:
        return _as_tuple(example_inputs)
    make = getattr(model, "example_inputs", None)
    if callable(make):
        return _as_tuple(make(2))
    raise ExportError(
        f"fuse({type(model).__name__}) needs example inputs to see which layer feeds which BatchNorm: "
        "pass example_inputs=(tensor, ...) or give the model an example_inputs(batch_size) method"
    )


def _pairable(producer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, _BATCHNORMS) or not bn.track_running_stats or bn.running_mean is None:
        return False
    if isinstance(producer, (*_CONVS, *_TRANSPOSED)):
        return producer.out_channels == bn.num_features
    if isinstance(producer, nn.Linear):
        return isinstance(bn, nn.BatchNorm1d) and producer.out_features == bn.num_features
    return False


class _UseCounter(TorchFunctionMode):
    """Counts, per tracked tensor, the torch calls that take it as an argument outside BatchNorm forwards:
    a conv output the BatchNorm reads and nothing else has no count."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, torch.Tensor] = {}
        self.uses: dict[int, int] = {}
        self.inside_bn = 0

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if not self.inside_bn and self.tracked:
            for leaf in pytree.tree_leaves((args, kwargs or {})):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.tracked:
                    self.uses[id(leaf)] = self.uses.get(id(leaf), 0) + 1
        return func(*args, **(kwargs or {}))


def find_bn_folds(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """``(producer name, batchnorm name)`` pairs that can be folded, found by running ``model`` once
    (in eval mode, under ``torch.no_grad``; its mode is restored) on ``example_inputs`` (default
    ``model.example_inputs(2)``).

    >>> import torchkiln as tk
    >>> find_bn_folds(tk.create_model("resnet-tiny", widths=(8,), blocks_per_stage=(1,)))
    [('stem.0', 'stem.1'), ('blocks.0.conv1', 'blocks.0.bn1'), ('blocks.0.conv2', 'blocks.0.bn2')]
    >>> find_bn_folds(tk.create_model("mlp"))
    []
    """
    names = {id(m): n for n, m in model.named_modules()}
    if not any(isinstance(m, _BATCHNORMS) for m in model.modules()):
        return []
    inputs = _example_inputs(model, example_inputs)
    counter = _UseCounter()
    calls: dict[str, int] = {}
    produced: dict[int, str] = {}  # id(output tensor) -> producer name
    fed_by: dict[str, tuple[str, int]] = {}  # bn name -> (producer name, id(input tensor))
    handles = []

    def count_call(module: nn.Module, args: Any) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(module, _BATCHNORMS):
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
                fed_by[name] = (produced[id(args[0])], id(args[0]))
            counter.inside_bn += 1

    def after_call(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, _BATCHNORMS):
            counter.inside_bn -= 1
        elif isinstance(output, torch.Tensor):
            produced[id(output)] = names[id(module)]
            counter.tracked[id(output)] = output  # keeps the id from being reused during the pass

    for module in model.modules():
        if isinstance(module, (*_CONVS, *_TRANSPOSED, nn.Linear, *_BATCHNORMS)):
            handles.append(module.register_forward_pre_hook(count_call))
            handles.append(module.register_forward_hook(after_call))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    folds = []
    for bn_name, (producer, tensor_id) in fed_by.items():
        if calls.get(bn_name) != 1 or calls.get(producer) != 1:
            continue  # a module that runs twice (shared weights) cannot absorb one BatchNorm
        if counter.uses.get(tensor_id, 0):
            continue  # the conv output is used outside the BatchNorm too (a branch, an in-place op...)
        if _pairable(modules[producer], modules[bn_name]):
            folds.append((producer, bn_name))
    return folds


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _fold(producer: nn.Module, bn: nn.Module) -> nn.Module:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if isinstance(producer, nn.Linear):
        # torch.nn.utils.fusion.fuse_linear_bn_eval does not accept affine=False BatchNorms.
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        fused = copy.deepcopy(producer)
        bias = producer.bias if producer.bias is not None else torch.zeros_like(bn.running_mean)
        fused.weight = nn.Parameter(producer.weight * scale[:, None], producer.weight.requires_grad)
        fused.bias = nn.Parameter(bias * scale + shift, producer.weight.requires_grad)
        return fused
    return fuse_conv_bn_eval(producer, bn, transpose=isinstance(producer, _TRANSPOSED))


def _max_abs_diff(a: Any, b: Any) -> float:
    la = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def fuse_with_report(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> FuseResult:
    """:func:`fuse`, also returning what was folded and the measured output difference."""
    inputs = _example_inputs(model, example_inputs)
    folds = find_bn_folds(model, inputs)
    if not folds:
        return FuseResult(model.eval() if inplace else model, [], None)
    was_training = model.training
    model.eval()
    try:
        reference = None
        if verify:
            with torch.no_grad():
                reference = model(*inputs)
        fused = model if inplace else copy.deepcopy(model)
        fused.eval()
        for producer, bn_name in folds:
            with torch.no_grad():
                folded = _fold(fused.get_submodule(producer), fused.get_submodule(bn_name))
            _set_submodule(fused, producer, folded)
            _set_submodule(fused, bn_name, nn.Identity())
        error = None
        if verify:
            with torch.no_grad():
                out = fused(*inputs)
            error = _max_abs_diff(out, reference)
            scale = max(
                (
                    float(t.abs().max())
                    for t in pytree.tree_leaves(reference)
                    if isinstance(t, torch.Tensor) and t.numel()
                ),
                default=0.0,
            )
            if not error <= atol + rtol * scale:
                raise FuseVerificationError(
                    f"folding BatchNorm into {', '.join(p for p, _ in folds)} changed the outputs by up to "
                    f"{error:.3g} (tolerance {atol:g} + {rtol:g} * {scale:.3g}); the model was not fused"
                )
    finally:
        if not inplace:
            model.train(was_training)
    return FuseResult(fused, folds, error)


def fuse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv/linear layer into it; return the fused model in
    eval mode (a copy unless ``inplace``). A model with nothing to fold is returned itself, unchanged.

    ``example_inputs`` (default ``model.example_inputs(2)``) drive one forward pass that finds the pairs
    and, with ``verify``, a check that outputs changed by at most ``atol + rtol * max|output|``
    (:class:`FuseVerificationError` otherwise).

    >>> import torchkiln as tk
    >>> mlp = tk.create_model("mlp")
    >>> fuse(mlp) is mlp  # nothing to fold: untouched
    True
    """
    return fuse_with_report(model, example_inputs, inplace=inplace, verify=verify, atol=atol, rtol=rtol).model
