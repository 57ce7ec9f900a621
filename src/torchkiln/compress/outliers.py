"""Activation outliers like those of trained transformers, injected into a (random) model, and a measure
of them, so quantization can be tested where it is hard.

Trained transformers develop "massive activations": a few tokens (the first one, delimiters) carry a huge
value in a few residual dimensions, and the inputs of the FFN output projection reach max/mean |x| well
above 100. One activation scale for the whole tensor (per-tensor) then leaves every other token a handful
of int8 levels; one scale per token survives. :func:`inject_activation_outliers` rewires a model's weights
so that this happens: residual dimension ``dim`` is written only by the position embedding of
``position`` (every other writer to it is zeroed), and ``channels`` hidden units of each FFN read that
dimension with a large gain, so their GELU output at that token is ``magnitude`` while the rest stay small.

Supported: torchkiln's ``gpt-tiny`` (``GPT``) and Hugging Face BERT-style encoders (``BertModel`` and
models holding one as ``.bert``).

>>> import torch, torchkiln as tk
>>> torch.manual_seed(0) and None
>>> model = tk.create_model("gpt-tiny", n_layer=2, n_embd=64, seq_len=32)
>>> info = inject_activation_outliers(model)
>>> ratios = activation_outlier_ratio(model, model.example_inputs(2), info["ffn_out_layers"])
>>> min(ratios.values()) > 100
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from torchkiln.errors import KilnError

__all__ = ["activation_outlier_ratio", "inject_activation_outliers"]


class OutlierError(KilnError, ValueError):
    """A model whose layout the outlier injection does not know."""


def _zero_row(linear: nn.Linear, row: int) -> None:
    linear.weight[row].zero_()
    if linear.bias is not None:
        linear.bias[row] = 0.0


def _layout(model: nn.Module) -> dict[str, Any]:
    from torchkiln.zoo.models import GPT

    if isinstance(model, GPT):
        return {
            "token_embeddings": [model.tok_emb],
            "position_embedding": model.pos_emb,
            "writers": [m for b in model.blocks for m in (b.attn.proj, b.mlp.proj)],
            "ffn": [
                (f"blocks.{i}.mlp.fc", b.mlp.fc, f"blocks.{i}.mlp.proj", b.mlp.proj)
                for i, b in enumerate(model.blocks)
            ],
            "width": model.tok_emb.embedding_dim,
        }
    bert = getattr(model, "bert", None)
    prefix = "bert." if bert is not None else ""
    bert = bert if bert is not None else model
    emb = getattr(bert, "embeddings", None)
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if emb is not None and layers is not None and hasattr(emb, "position_embeddings"):
        tokens = [emb.word_embeddings] + (
            [emb.token_type_embeddings] if hasattr(emb, "token_type_embeddings") else []
        )
        return {
            "token_embeddings": tokens,
            "position_embedding": emb.position_embeddings,
            "writers": [m for layer in layers for m in (layer.attention.output.dense, layer.output.dense)],
            "ffn": [
                (
                    f"{prefix}encoder.layer.{i}.intermediate.dense",
                    layer.intermediate.dense,
                    f"{prefix}encoder.layer.{i}.output.dense",
                    layer.output.dense,
                )
                for i, layer in enumerate(layers)
            ],
            "width": emb.word_embeddings.embedding_dim,
        }
    raise OutlierError(
        f"inject_activation_outliers does not know the layout of {type(model).__name__}; supported: "
        "torchkiln gpt-tiny (GPT) and Hugging Face BERT-style encoders "
        "(embeddings.position_embeddings + encoder.layer)"
    )


@torch.no_grad()
def inject_activation_outliers(
    model: nn.Module,
    *,
    magnitude: float = 60.0,
    channels: int = 2,
    position: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Rewire ``model`` (in place) so the token at ``position`` has massive activations: returns
    ``{"dim", "position", "channels", "ffn_out_layers", "ffn_in_layers"}``.

    ``magnitude``: the FFN hidden value (GELU output) of the outlier channels at that token; ordinary
    values of a randomly initialised model are ~0.1, so the default gives max/mean |x| of several hundred
    at the FFN output projection's input. ``channels``: outlier hidden units per FFN.
    """
    layout = _layout(model)
    width = layout["width"]
    gen = torch.Generator().manual_seed(seed)
    dim = int(torch.randint(0, width, (1,), generator=gen))
    pos = layout["position_embedding"]
    if not 0 <= position < pos.num_embeddings:
        raise OutlierError(
            f"position {position} is outside the position embedding (0..{pos.num_embeddings - 1})"
        )
    # Residual dimension `dim` carries a large value at `position` and nothing anywhere else.
    for emb in layout["token_embeddings"]:
        emb.weight[:, dim] = 0.0
    pos.weight[:, dim] = 0.0
    pos.weight[position, dim] = 10.0 * math.sqrt(width)
    for writer in layout["writers"]:
        _zero_row(writer, dim)
    # After a LayerNorm that dimension reads ~sqrt(width) at `position`, ~0 elsewhere.
    gain = magnitude / math.sqrt(width)
    chosen: dict[str, list[int]] = {}
    for fc_name, fc, _, proj in layout["ffn"]:
        hidden = fc.out_features
        units = torch.randperm(hidden, generator=gen)[:channels].tolist()
        for c in units:
            fc.weight[c].zero_()
            fc.weight[c, dim] = gain
            if fc.bias is not None:
                fc.bias[c] = 0.0
            # Trained models pair huge activations with small downstream weights.
            proj.weight[:, c] *= 1.0 / max(1.0, magnitude / 4)
        chosen[fc_name] = units
    return {
        "dim": dim,
        "position": position,
        "channels": chosen,
        "ffn_in_layers": [f for f, _, _, _ in layout["ffn"]],
        "ffn_out_layers": [p for _, _, p, _ in layout["ffn"]],
    }


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def activation_outlier_ratio(model: nn.Module, inputs: Any, layers: Iterable[str]) -> dict[str, float]:
    """max |x| / mean |x| of the input of each named layer over one forward pass on ``inputs``."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise OutlierError(f"no layer named {', '.join(missing)} in {type(model).__name__}")
    ratios: dict[str, float] = {}
    hooks = []
    for name in layers:

        def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().abs().float()
            ratios[name] = float(x.max() / x.mean().clamp_min(1e-12))

        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        _call(model.eval(), inputs)
    finally:
        for h in hooks:
            h.remove()
    return ratios
