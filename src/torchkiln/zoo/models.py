"""Built-in models: ``mlp``, ``resnet-tiny`` and ``gpt-tiny``, small enough for a CPU and real enough to
show what each optimization buys.

Every model has ``example_inputs(batch_size)`` returning a tuple of inputs of the right shape and dtype.

>>> from torchkiln.zoo import create_model
>>> model = create_model("mlp", hidden=(32,))
>>> model(*model.example_inputs(4)).shape
torch.Size([4, 10])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchkiln.zoo.registry import MODELS

__all__ = [
    "MLP",
    "ResNetTiny",
    "ResidualBlock",
    "GPT",
    "Block",
    "CausalSelfAttention",
    "FeedForward",
    "mlp",
    "resnet_tiny",
    "gpt_tiny",
]


def _positive(name: str, value: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- mlp


class MLPBlock(nn.Sequential):
    """Linear -> LayerNorm? -> ReLU -> Dropout?: one hidden layer (what activation checkpointing wraps)."""

    def __init__(self, width: int, out: int, norm: bool, dropout: float) -> None:
        layers: list[nn.Module] = [nn.Linear(width, out)]
        if norm:
            layers.append(nn.LayerNorm(out))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class MLP(nn.Module):
    """Flatten -> MLPBlock * len(hidden) -> Linear."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
        norm: bool = True,
    ) -> None:
        super().__init__()
        _positive("in_features", in_features, "mlp")
        _positive("num_classes", num_classes, "mlp")
        hidden = tuple(hidden)
        for h in hidden:
            _positive("each hidden width", h, "mlp")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mlp: dropout must be in [0, 1), got {dropout!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        blocks: list[nn.Module] = []
        width = in_features
        for h in hidden:
            blocks.append(MLPBlock(width, h, norm, dropout))
            width = h
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP expects inputs with {self.in_features} features per sample (after flattening), "
                f"got shape {tuple(x.shape)}; build it with in_features={x.shape[1]}"
            )
        return self.head(self.body(x))

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor]:
        return (torch.rand(batch_size, self.in_features),)


@MODELS.register("mlp")
def mlp(
    in_features: int = 64,
    hidden: tuple[int, ...] = (256, 256),
    num_classes: int = 10,
    dropout: float = 0.0,
    norm: bool = True,
) -> MLP:
    """Multi-layer perceptron classifier on flattened inputs (LayerNorm + ReLU between layers).

    >>> model = mlp(in_features=64, hidden=(128,), num_classes=10)
    >>> model(torch.rand(8, 1, 8, 8)).shape
    torch.Size([8, 10])
    """
    return MLP(in_features, hidden, num_classes, dropout, norm)


# ------------------------------------------------------------------------------------- resnet-tiny


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetTiny(nn.Module):
    """Stem conv3x3-BN-ReLU, residual stages (stride 2 between stages), global average pool, linear.

    All blocks sit in one flat ``nn.Sequential`` (``self.blocks``) so activation checkpointing and
    pruning can find them as one homogeneous container.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks_per_stage: tuple[int, ...] = (1, 1, 1),
    ) -> None:
        super().__init__()
        _positive("in_channels", in_channels, "resnet-tiny")
        _positive("num_classes", num_classes, "resnet-tiny")
        widths, blocks_per_stage = tuple(widths), tuple(blocks_per_stage)
        if not widths or len(widths) != len(blocks_per_stage):
            raise ValueError(
                f"resnet-tiny: widths {widths} and blocks_per_stage {blocks_per_stage} must be non-empty "
                "and of the same length (one entry per stage)"
            )
        for w in widths:
            _positive("each width", w, "resnet-tiny")
        for n in blocks_per_stage:
            _positive("each blocks_per_stage entry", n, "resnet-tiny")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[ResidualBlock] = []
        channels = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResidualBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block: every block starts as the identity (trains faster).
        for block in blocks:
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetTiny expects images (batch, {self.in_channels}, height, width), got shape "
                f"{tuple(x.shape)}; build it with in_channels matching the data"
            )
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))

    def example_inputs(self, batch_size: int = 2, size: int = 8) -> tuple[torch.Tensor]:
        return (torch.rand(batch_size, self.in_channels, size, size),)


@MODELS.register("resnet-tiny")
def resnet_tiny(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: tuple[int, ...] = (32, 64, 128),
    blocks_per_stage: tuple[int, ...] = (1, 1, 1),
) -> ResNetTiny:
    """Small residual conv net (BatchNorm, stride-2 stages) for 8x8 digits up to 32x32 colour images.

    >>> model = resnet_tiny(in_channels=3, widths=(16, 32), blocks_per_stage=(1, 1))
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return ResNetTiny(in_channels, num_classes, widths, blocks_per_stage)


# ---------------------------------------------------------------------------------------- gpt-tiny


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"gpt-tiny: n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.n_embd = n_embd
        # The attention width is n_head * head_dim; it equals n_embd until heads are pruned away
        # (torchkiln.compress.prune updates n_head and head_dim when it removes heads).
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        width = self.n_head * self.head_dim
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (B, T, self.n_head, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # boolean (B, 1, T, T), True = may attend; causal already folded in
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, width)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Linear (4x) -> GELU -> Linear -> Dropout."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, ``Block``s, LayerNorm, tied LM head."""

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for key, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        ):
            _positive(key, value, "gpt-tiny")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"gpt-tiny: dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.n_layer = n_layer
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(seq_len, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (after init: one tensor, N(0, 0.02))
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth.
        std = 0.02 / math.sqrt(2 * n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` ``(B, T)`` (or ``input_ids=``, as in the
        dict batches of :func:`torchkiln.data.pad_collate`).

        ``attention_mask`` ``(B, T)`` marks real tokens with 1 and padding with 0. With a mask, each
        position attends only to earlier real tokens (and itself, so fully padded rows stay finite),
        and position ids count real tokens only, so left- or right-padding leaves the logits of real
        positions unchanged. Packed blocks (:class:`torchkiln.data.PackedBlocks`) pass
        ``document_ids`` ``(B, T)`` (attention stays inside each document) and ``position_ids``.
        """
        if idx is None:
            idx = input_ids
        elif input_ids is not None:
            raise TypeError("GPT.forward: pass the token ids as idx or input_ids, not both")
        if idx is None:
            raise TypeError("GPT.forward needs token ids (idx or input_ids)")
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.seq_len:
            raise ValueError(
                f"GPT got a sequence of length {T} but was built with seq_len={self.seq_len}; "
                f"pass at most {self.seq_len} tokens or build the model with seq_len>={T}"
            )
        attn_mask = None
        if attention_mask is None and document_ids is None:
            pos = torch.arange(T, device=idx.device).unsqueeze(0)
        else:
            for name, value in (("attention_mask", attention_mask), ("document_ids", document_ids)):
                if value is not None and value.shape != idx.shape:
                    raise ValueError(
                        f"GPT {name} must have the shape of idx {tuple(idx.shape)}, got {tuple(value.shape)}"
                    )
            if attention_mask is None:
                real = torch.ones_like(idx, dtype=torch.bool)
            else:
                real = attention_mask.to(torch.bool)
            pos = (real.long().cumsum(1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=idx.device)
            allowed = causal & real[:, None, :]
            if document_ids is not None:
                allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
            attn_mask = (allowed | eye).unsqueeze(1)  # (B, 1, T, T)
        if position_ids is not None:
            pos = position_ids
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.lm_head(self.ln_f(x))

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> tuple[torch.Tensor]:
        T = self.seq_len if seq_len is None else seq_len
        return (torch.randint(0, self.vocab_size, (batch_size, T)),)


@MODELS.register("gpt-tiny")
def gpt_tiny(
    vocab_size: int = 256,
    seq_len: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    bias: bool = True,
) -> GPT:
    """GPT-2 style decoder-only transformer (pre-LN, SDPA causal attention, tied LM head).

    >>> model = gpt_tiny(vocab_size=64, seq_len=16, n_layer=2, n_embd=32)
    >>> model(torch.randint(0, 64, (2, 16))).shape
    torch.Size([2, 16, 64])
    """
    return GPT(vocab_size, seq_len, n_layer, n_head, n_embd, dropout, bias)
