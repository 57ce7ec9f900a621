"""Structured pruning that removes channels, neurons and attention heads physically, so the pruned model is
smaller *and* faster, and a format that saves and reloads pruned models with their new shapes.

``tk.prune(model, ChannelPrune(ratio=0.5), example_inputs=x)`` removes half the channels of every prunable
group that Torch-Pruning's dependency graph finds (a conv and the BatchNorm, residual adds, concatenations
and grouped/depthwise convs it is coupled to are cut together), rounds what is left to a multiple of
``round_to`` (default 8: vector units and GEMM tiles like multiples of 8, odd widths run slower) and removes
``head_ratio`` of the heads of every attention layer it knows (torchkiln's ``CausalSelfAttention`` with its
fused ``qkv``; Hugging Face ``query``/``key``/``value`` attention such as BERT's), updating ``n_head`` /
``num_attention_heads`` / ``all_head_size`` so the model still runs. Kept as they are: the output layer
(found by tracing which layers feed the model's output), embeddings (they set a transformer's residual
width, shared by every block), attention layers of unknown layout, and modules matching ``ignored`` name
patterns. BatchNorm statistics are re-estimated on ``calibration`` data after pruning.

>>> import torch, torchkiln as tk
>>> torch.manual_seed(0) and None
>>> model = tk.create_model("mlp", hidden=(64, 64))
>>> pruned = tk.prune(model, ChannelPrune(ratio=0.5), example_inputs=model.example_inputs(2))
>>> [m.out_features for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
[32, 32, 10]

:func:`save_pruned` writes the pruned weights with a description of every module whose shape or width
attributes changed and a reference to how the unpruned model is built (a zoo name or ``pkg.mod:fn`` and its
arguments, or a Hugging Face class and config); :func:`load_pruned` rebuilds it, re-shapes those modules
and loads the weights with ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.compress.registry import register_technique
from torchkiln.errors import KilnError

__all__ = [
    "ChannelPrune",
    "PruneError",
    "attention_heads",
    "channel_prune",
    "find_output_layers",
    "load_pruned",
    "recalibrate_batchnorm",
    "save_pruned",
]

FORMAT = "torchkiln-pruned"
FORMAT_VERSION = 1
IMPORTANCES = ("l2", "l1", "taylor", "random")


class PruneError(KilnError, ValueError):
    """A pruning config, model or saved pruned model that cannot be used, with what would be accepted."""


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ChannelPrune:
    """Remove ``ratio`` of the channels/neurons of every prunable group and ``head_ratio`` of the heads of
    every attention layer (default: ``ratio``), physically.

    ``round_to``: channels left are rounded down to a multiple of this (``None``: no rounding; a group too
    narrow to keep one multiple is left whole). ``importance``: ``"l2"`` / ``"l1"`` (group weight norms),
    ``"taylor"`` (|weight x gradient|, needs ``calibration`` data) or ``"random"``. ``global_pruning``:
    rank channels across all groups instead of per group (uneven widths). ``ignored``: module-name
    patterns (``fnmatch``, e.g. ``"blocks.0.*"``) never pruned. ``protect_output``: keep the layers that
    produce the model's output (classifier, LM head). ``calibration_batches``: batches of calibration data
    used to re-estimate BatchNorm statistics (and Taylor gradients).
    """

    ratio: float = 0.5
    head_ratio: float | None = None
    round_to: int | None = 8
    importance: str = "l2"
    global_pruning: bool = False
    ignored: tuple[str, ...] = ()
    protect_output: bool = True
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PruneError(f"ChannelPrune.ratio must be in [0, 1), got {self.ratio!r}")
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise PruneError(f"ChannelPrune.head_ratio must be in [0, 1) or None, got {self.head_ratio!r}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or self.round_to < 1):
            raise PruneError(
                f"ChannelPrune.round_to must be a positive integer or None, got {self.round_to!r}"
            )
        if self.importance not in IMPORTANCES:
            raise PruneError(
                f"ChannelPrune.importance={self.importance!r} is unknown; accepted: {', '.join(IMPORTANCES)}"
            )
        if self.calibration_batches < 1:
            raise PruneError(f"ChannelPrune.calibration_batches must be >= 1, got {self.calibration_batches}")
        if isinstance(self.ignored, str):
            object.__setattr__(self, "ignored", (self.ignored,))
        else:
            object.__setattr__(self, "ignored", tuple(self.ignored))


# ------------------------------------------------------------------------------------------------ helpers


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _example_inputs(model: nn.Module, example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    make = getattr(model, "example_inputs", None)
    if callable(make):
        return make(2)
    raise PruneError(
        f"pruning {type(model).__name__} needs example_inputs= (a tensor, a tuple of positional inputs or a "
        "dict of keyword inputs) to trace its dependency graph; the model has no example_inputs() method"
    )


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        found: list[torch.Tensor] = []
        for item in out:
            found.extend(_tensors(item))
        return found
    return []


_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def find_output_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the layers (Linear, Conv, Embedding) whose output reaches the model's output without passing
    through another such layer: the classifier / LM head, whose width is the model's output shape.

    >>> import torchkiln as tk
    >>> find_output_layers(tk.create_model("resnet-tiny"), tk.create_model("resnet-tiny").example_inputs(2))
    ['head']
    """
    names = {m: n for n, m in model.named_modules()}
    grad_fn_of: dict[Any, nn.Module] = {}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            grad_fn_of[out.grad_fn] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LAYER_TYPES)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    found: list[str] = []
    seen: set[int] = set()
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        module = grad_fn_of.get(fn)
        if module is not None:
            name = names[module]
            if name not in found:
                found.append(name)
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return sorted(found)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def _batches(data: Any, limit: int) -> Iterable[tuple[tuple, dict[str, Any], Any]]:
    """Up to ``limit`` ``(args, kwargs, target)`` from a Dataset, DataLoader or iterable of batches."""
    from torchkiln.train.loop import make_loader
    from torchkiln.train.loss import LossComputer

    splitter = LossComputer("cross_entropy")
    loader = make_loader(data, batch_size=64, shuffle=False, seed=0)
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        if isinstance(batch, torch.Tensor):
            yield (batch,), {}, None
        else:
            yield splitter.split(batch)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Any, batches: int = 8) -> int:
    """Re-estimate every BatchNorm's running mean/variance on ``batches`` batches of ``data``; return the
    number of BatchNorm layers reset.

    After channels are removed upstream of a BatchNorm, the statistics it kept describe activations that no
    longer exist. The running statistics are reset and re-accumulated as an exact average (``momentum=None``)
    with only the BatchNorm layers in train mode (dropout stays off), under ``no_grad``; the model is left
    in eval mode.
    """
    from torchkiln.train.loss import move_to

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    device = _device_of(model)
    momenta = [bn.momentum for bn in norms]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every calibration batch counts the same
        bn.train()
    seen = 0
    try:
        for args, kwargs, _ in _batches(data, batches):
            args, kwargs = move_to((args, kwargs), device)
            model(*args, **kwargs)
            seen += 1
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
    if seen == 0:
        raise PruneError("the calibration data produced no batch to re-estimate BatchNorm statistics with")
    return len(norms)


# ------------------------------------------------------------------------------------------------ attention


@dataclass
class AttentionHeads:
    """One attention layer in a layout torchkiln knows how to prune by whole heads."""

    name: str
    module: nn.Module
    n_head: int
    head_dim: int
    #: (linear, row offset) of the query, key and value projections (one fused linear: three offsets)
    inputs: list[tuple[nn.Linear, int]]
    output: nn.Linear
    kind: str

    def set_heads(self, n: int) -> None:
        m = self.module
        if self.kind == "torchkiln":
            m.n_head = n
        else:  # Hugging Face
            m.num_attention_heads = n
            m.all_head_size = n * self.head_dim
        self.n_head = n


def attention_heads(model: nn.Module) -> tuple[list[AttentionHeads], list[str]]:
    """``(known, unknown)``: attention layers whose heads can be pruned, and names of other modules that look
    like attention (a head count attribute, or ``nn.MultiheadAttention``) and are therefore left alone."""
    known: list[AttentionHeads] = []
    unknown: list[str] = []
    for name, m in model.named_modules():
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        n_head, head_dim = getattr(m, "n_head", None), getattr(m, "head_dim", None)
        if (
            isinstance(qkv, nn.Linear)
            and isinstance(proj, nn.Linear)
            and isinstance(n_head, int)
            and isinstance(head_dim, int)
            and qkv.out_features == 3 * n_head * head_dim
            and proj.in_features == n_head * head_dim
        ):
            width = n_head * head_dim
            known.append(
                AttentionHeads(
                    name, m, n_head, head_dim, [(qkv, 0), (qkv, width), (qkv, 2 * width)], proj, "torchkiln"
                )
            )
            continue
        q, k, v = (getattr(m, a, None) for a in ("query", "key", "value"))
        n_head, head_dim = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
        if (
            all(isinstance(t, nn.Linear) for t in (q, k, v))
            and isinstance(n_head, int)
            and isinstance(head_dim, int)
        ):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            out = getattr(getattr(parent, "output", None), "dense", None)
            width = n_head * head_dim
            if (
                isinstance(out, nn.Linear)
                and out.in_features == width
                and all(t.out_features == width for t in (q, k, v))
            ):
                known.append(AttentionHeads(name, m, n_head, head_dim, [(q, 0), (k, 0), (v, 0)], out, "hf"))
                continue
        if isinstance(m, nn.MultiheadAttention) or any(
            isinstance(getattr(m, a, None), int)
            for a in ("num_heads", "n_head", "num_attention_heads", "n_heads")
        ):
            unknown.append(name)
    return known, unknown


def _head_scores(att: AttentionHeads, importance: str) -> torch.Tensor:
    """One score per head from the weights (and gradients for Taylor) of its q/k/v rows and output columns."""
    hd = att.head_dim
    scores = torch.zeros(att.n_head)
    if importance == "random":
        return torch.rand(att.n_head)
    for h in range(att.n_head):
        parts = []
        for linear, offset in att.inputs:
            rows = slice(offset + h * hd, offset + (h + 1) * hd)
            parts.append(
                (linear.weight[rows], None if linear.weight.grad is None else linear.weight.grad[rows])
            )
        cols = slice(h * hd, (h + 1) * hd)
        out = att.output
        parts.append((out.weight[:, cols], None if out.weight.grad is None else out.weight.grad[:, cols]))
        total = 0.0
        for w, g in parts:
            w = w.detach().float()
            if importance == "l1":
                total += float(w.abs().sum())
            elif importance == "taylor":
                if g is None:
                    raise PruneError("importance='taylor' needs gradients: pass calibration= data")
                total += float((w * g.float()).abs().sum())
            else:
                total += float(w.pow(2).sum())
        scores[h] = total if importance != "l2" else math.sqrt(total)
    return scores


def _keep_linear_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(
        linear.weight.detach()[rows].clone(), requires_grad=linear.weight.requires_grad
    )
    if linear.bias is not None:
        linear.bias = nn.Parameter(
            linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad
        )
    linear.out_features = int(rows.numel())


def _keep_linear_cols(linear: nn.Linear, cols: torch.Tensor) -> None:
    w = linear.weight
    linear.weight = nn.Parameter(w.detach()[:, cols].clone(), requires_grad=w.requires_grad)
    linear.in_features = int(cols.numel())


def prune_heads(att: AttentionHeads, keep: list[int]) -> None:
    """Keep only the heads ``keep`` (indices, any order) of one attention layer; widths and counts updated."""
    keep = sorted(set(keep))
    if not keep:
        raise PruneError(f"{att.name}: cannot remove every attention head")
    hd = att.head_dim
    within = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
    fused: dict[int, list[torch.Tensor]] = {}
    linears: dict[int, nn.Linear] = {}
    for linear, offset in att.inputs:
        fused.setdefault(id(linear), []).append(within + offset)
        linears[id(linear)] = linear
    for key, rows in fused.items():
        _keep_linear_rows(linears[key], torch.cat(rows))
    _keep_linear_cols(att.output, within)
    att.set_heads(len(keep))


# ------------------------------------------------------------------------------------------------ pruning


def _accumulate_gradients(model: nn.Module, data: Any, batches: int, loss_fn: Callable | None) -> None:
    from torchkiln.train.loss import LossComputer, move_to

    computer = LossComputer(loss_fn or "cross_entropy", model=model)
    device = _device_of(model)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    try:
        for args, kwargs, target in _batches(data, batches):
            args, kwargs, target = move_to((args, kwargs, target), device)
            out = model(*args, **kwargs)
            computer.mean(out, target).backward()
    finally:
        model.train(was_training)


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


@register_technique(
    "prune/channels",
    ChannelPrune,
    needs=("torch_pruning",),
    summary="structured pruning: channels, neurons and attention heads removed physically (dependency graph)",
)
def channel_prune(
    model: nn.Module,
    config: ChannelPrune,
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    loss_fn: Callable | str | None = None,
) -> nn.Module:
    """Prune ``model`` in place by ``config`` (see :class:`ChannelPrune`) and return it, in eval mode.

    ``example_inputs`` (default ``model.example_inputs(2)``) are traced to build the dependency graph.
    ``calibration`` (a Dataset, DataLoader or iterable of batches) re-estimates BatchNorm statistics and,
    for ``importance="taylor"``, gives the gradients (with ``loss_fn``, default cross-entropy).
    """
    import torch_pruning as tp

    if not isinstance(config, ChannelPrune):
        raise PruneError(f"channel_prune needs a ChannelPrune config, got {type(config).__name__}")
    inputs = _example_inputs(model, example_inputs)
    head_ratio = config.ratio if config.head_ratio is None else config.head_ratio
    if config.importance == "taylor":
        if calibration is None:
            raise PruneError("importance='taylor' ranks by |weight x gradient|: pass calibration= data")
        _accumulate_gradients(model, calibration, config.calibration_batches, loss_fn)

    protected: set[str] = set()
    if config.protect_output:
        protected.update(find_output_layers(model, inputs))
    known, unknown = attention_heads(model)

    # 1. Attention heads: whole heads out of the q/k/v projections and the output projection's columns.
    for att in known:
        if _matches(att.name, config.ignored) or head_ratio == 0.0:
            continue
        n_remove = min(att.n_head - 1, int(round(att.n_head * head_ratio)))
        if n_remove <= 0:
            continue
        scores = _head_scores(att, config.importance)
        keep = torch.argsort(scores, descending=True)[: att.n_head - n_remove].tolist()
        prune_heads(att, keep)

    # 2. Channels and neurons, through the dependency graph. Left whole: protected layers, embeddings (the
    # residual width of a transformer), attention projections (heads were handled above; an unknown layout
    # is not guessed at) and what the user named.
    ignored_layers: list[nn.Module] = []
    attention_linears = {id(lin) for att in known for lin, _ in att.inputs} | {
        id(att.output) for att in known
    }
    for name, m in model.named_modules():
        if name in protected or (name and _matches(name, config.ignored)):
            ignored_layers.append(m)
        elif isinstance(m, (nn.Embedding, nn.MultiheadAttention)) or id(m) in attention_linears:
            ignored_layers.append(m)
        elif any(name == u or name.startswith(u + ".") for u in unknown):
            ignored_layers.append(m)
    if config.ratio > 0:
        pruner = tp.pruner.BasePruner(
            model,
            inputs if isinstance(inputs, (Mapping, tuple, list)) else (inputs,),
            importance=_importance(config.importance),
            pruning_ratio=config.ratio,
            global_pruning=config.global_pruning,
            ignored_layers=ignored_layers,
            round_to=config.round_to,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about layers it only passes through
            for group in pruner.step(interactive=True):
                group.prune()
    model.zero_grad(set_to_none=True)
    for m in model.modules():  # keep the width attributes of every layer in step with its weights
        if isinstance(m, nn.Linear):
            m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]

    if calibration is not None:
        recalibrate_batchnorm(model, calibration, config.calibration_batches)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn(
            "channel_prune: the model has BatchNorm layers and no calibration= data was given; their running "
            "statistics are the unpruned model's (re-estimate them with recalibrate_batchnorm or fine-tune)",
            stacklevel=2,
        )
    model.eval()
    try:
        with torch.no_grad():
            _call(model, inputs)
    except Exception as exc:
        offenders = ", ".join(unknown) or "none found"
        raise PruneError(
            f"the pruned {type(model).__name__} no longer runs on the example inputs ({type(exc).__name__}: "
            f"{exc}); a module whose forward depends on a width it stores may need to be listed in "
            f"ChannelPrune(ignored=...) (attention-like modules left alone: {offenders})"
        ) from exc
    return model


# ------------------------------------------------------------------------------------------------ save / load

_SIMPLE = (int, float, bool, str, type(None))


def _simple(value: Any) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value)


@dataclass(frozen=True)
class ModelRef:
    """How the unpruned model is built: a zoo name or ``pkg.mod:fn`` with arguments, or a Hugging Face
    class name with its config (JSON)."""

    name: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    hf_class: str | None = None
    hf_config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.hf_class is not None:
            return {"kind": "transformers", "class": self.hf_class, "config": self.hf_config}
        return {"kind": "factory", "name": self.name, "args": _plain(self.args)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> ModelRef:
        if d.get("kind") == "transformers":
            return ModelRef(hf_class=d["class"], hf_config=d["config"])
        return ModelRef(name=d["name"], args=dict(d.get("args") or {}))

    def build(self) -> nn.Module:
        if self.hf_class is not None:
            import transformers

            cls = getattr(transformers, self.hf_class, None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise PruneError(f"transformers has no model class {self.hf_class!r}")
            config = cls.config_class.from_dict(json.loads(self.hf_config or "{}"))
            return cls(config)
        from torchkiln.zoo import create_model

        return create_model(self.name, **self.args)

    def describe(self) -> str:
        if self.hf_class is not None:
            return f"transformers.{self.hf_class}(config)"
        args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        return f"{self.name}({args})"


def _plain(value: Any) -> Any:
    """Arguments in types ``weights_only`` loading accepts (tuples stay tuples)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, _SIMPLE):
        return value
    raise PruneError(f"model argument {value!r} ({type(value).__name__}) cannot be saved; use plain values")


def _model_ref(
    model: nn.Module, model_ref: str | ModelRef | None, model_args: Mapping[str, Any] | None
) -> ModelRef:
    if isinstance(model_ref, ModelRef):
        return model_ref
    if model_ref is not None:
        return ModelRef(name=model_ref, args=dict(model_args or {}))
    config = getattr(model, "config", None)
    if (
        config is not None
        and hasattr(config, "to_json_string")
        and type(model).__module__.startswith("transformers")
    ):
        return ModelRef(hf_class=type(model).__name__, hf_config=config.to_json_string(use_diff=False))
    raise PruneError(
        f"save_pruned needs model_ref= for a {type(model).__name__}: the zoo name or "
        "'package.module:function' that builds the unpruned model (with model_args=), "
        "so load_pruned can rebuild it before re-shaping"
    )


def _attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _simple(v)}


def describe_changes(reference: nn.Module, pruned: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module name, what differs between ``reference`` (unpruned, freshly built) and ``pruned``:
    ``{"tensors": {name: shape}, "attrs": {name: value}}``."""
    ref_modules = dict(reference.named_modules())
    changes: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        ref = ref_modules.get(name)
        if ref is None or type(ref) is not type(module):
            raise PruneError(
                f"module {name or '<root>'!r} ({type(module).__name__}) is not in the model built from the "
                "reference (or has another type): save_pruned handles models whose modules were re-shaped, "
                "not replaced"
            )
        tensors = {}
        for pname, t in list(module._parameters.items()) + list(module._buffers.items()):
            ref_t = getattr(ref, pname, None)
            if t is not None and (ref_t is None or tuple(ref_t.shape) != tuple(t.shape)):
                tensors[pname] = list(t.shape)
        ref_attrs = _attrs(ref)
        attrs = {k: v for k, v in _attrs(module).items() if ref_attrs.get(k, object()) != v}
        if tensors or attrs:
            changes[name] = {"tensors": tensors, "attrs": attrs}
    return changes


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_ref: str | ModelRef | None = None,
    model_args: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a pruned ``model`` to ``path``: its weights, every changed module's shapes and width attributes,
    and how to build the unpruned model (``model_ref``: a zoo name or ``pkg.mod:fn`` with ``model_args``;
    Hugging Face models are found from their config). Written atomically; read back with :func:`load_pruned`.
    """
    from torchkiln.train.checkpoint import atomic_save

    ref = _model_ref(model, model_ref, model_args)
    reference = ref.build()
    changes = describe_changes(reference, model)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_ref": ref.to_dict(),
        "changes": changes,
        "state_dict": model.state_dict(),
        "metadata": _plain(dict(metadata or {})),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(payload, target)
    return target


def apply_changes(model: nn.Module, changes: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Re-shape ``model``'s modules as ``changes`` describes (empty tensors of the new shapes, attributes
    set); tensors shared between modules (tied weights) stay shared."""
    replaced: dict[int, torch.Tensor] = {}
    for name, change in changes.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            raise PruneError(
                f"the saved model re-shapes {name!r}, which the rebuilt model does not have"
            ) from None
        for tname, shape in change.get("tensors", {}).items():
            old = getattr(module, tname, None)
            if old is not None and id(old) in replaced:
                new = replaced[id(old)]
            else:
                like = old if old is not None else torch.empty(0)
                new = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
                if isinstance(old, nn.Parameter) or tname in module._parameters:
                    new = nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True)
                if old is not None:
                    replaced[id(old)] = new
            if tname in module._parameters:
                module._parameters[tname] = new
            else:
                module._buffers[tname] = new
        for aname, value in change.get("attrs", {}).items():
            setattr(module, aname, tuple(value) if isinstance(value, list) else value)
    return model


def load_pruned(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_pruned`: build the unpruned model from its reference, re-shape
    the changed modules, load the weights (``weights_only=True``); returned in eval mode."""
    p = Path(path)
    if not p.is_file():
        raise PruneError(f"pruned model file not found: {p}")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise PruneError(
            f"{p} cannot be read as a torchkiln pruned model: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PruneError(f"{p} is not a torchkiln pruned model (written by save_pruned / kiln prune)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise PruneError(
            f"{p} has format version {payload['format_version']}; this torchkiln reads up to {FORMAT_VERSION}"
        )
    ref = ModelRef.from_dict(payload["model_ref"])
    model = apply_changes(ref.build(), payload["changes"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise PruneError(f"{p}: the weights do not fit the rebuilt {ref.describe()}: {exc}") from exc
    return model.eval()


def read_pruned_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model_ref``, ``changes`` and ``metadata`` of a saved pruned model (weights not returned)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    return {k: payload.get(k) for k in ("model_ref", "changes", "metadata")}


# Unstructured magnitude pruning lives in its own module; importing it here registers prune/magnitude with
# the other prune/* techniques.
from torchkiln.compress import sparse as _sparse  # noqa: E402,F401
