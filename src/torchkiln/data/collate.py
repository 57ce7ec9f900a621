"""Padding and packing collates for token sequences.

:func:`pad_collate` right-pads a list of samples to the longest one and returns
``{"input_ids", "attention_mask", "labels"}``. For a plain token sequence ``t`` (next-token LM), the
inputs are ``t`` and the labels are ``t`` shifted left by one, the last position (which has nothing to
predict) and the padding set to ``label_pad`` (-100, ignored by the loss). So a sample of length ``L``
costs exactly ``L`` computed positions -- the length the :class:`~torchkiln.data.TokenBudgetSampler`
budgets for -- and contributes ``L - 1`` loss tokens.

>>> import torch
>>> b = pad_collate([torch.tensor([5, 6, 7]), torch.tensor([8, 9])])
>>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
([[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]], [[6, 7, -100], [9, -100, -100]])

:class:`PackedBlocks` concatenates documents into fixed-length blocks instead (no padding at all);
:func:`packed_collate` returns ``position_ids`` that restart at every document and ``document_ids`` from
which the block-diagonal causal mask follows (:func:`block_causal_mask`; ``gpt-tiny`` takes
``document_ids`` directly). Labels that would predict the first token of the next document are -100.

>>> blocks = PackedBlocks([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7])], block_len=6)
>>> item = blocks[0]
>>> item["input_ids"].tolist(), item["labels"].tolist()
([1, 2, 3, 4, 5, 6], [2, 3, -100, 5, 6, 7])
>>> item["position_ids"].tolist(), item["document_ids"].tolist()
([0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

TOKEN_KEYS = ("input_ids", "tokens")


def _as_1d(value: Any, what: str) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.ndim != 1:
        raise ValueError(
            f"pad_collate: {what} must be a 1-d sequence of token ids, got shape {tuple(t.shape)}"
        )
    if t.is_floating_point():
        raise ValueError(f"pad_collate: {what} must hold integer token ids, got {t.dtype}")
    return t.long()


def _split_sample(sample: Any, label_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of one sample, both 1-d and of the same length."""
    if isinstance(sample, Mapping):
        key = next((k for k in TOKEN_KEYS if k in sample), None)
        if key is None:
            raise ValueError(
                f"pad_collate: dict sample needs 'input_ids' or 'tokens', got keys {sorted(sample)}"
            )
        x = _as_1d(sample[key], key)
        if "labels" in sample:
            return x, _as_1d(sample["labels"], "labels")
        return x, _shifted(x, label_pad)
    if isinstance(sample, (tuple, list)) and len(sample) == 2 and not isinstance(sample[0], int):
        x, y = _as_1d(sample[0], "x"), _as_1d(sample[1], "y")
        return x, y
    x = _as_1d(sample, "sample")
    return x, _shifted(x, label_pad)


def _shifted(x: torch.Tensor, label_pad: int) -> torch.Tensor:
    y = torch.full_like(x, label_pad)
    y[:-1] = x[1:]
    return y


def pad_collate(
    samples: Sequence[Any], *, pad_id: int = 0, label_pad: int = -100, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad ``samples`` into ``{"input_ids", "attention_mask", "labels"}`` (all ``(B, T)`` int64).

    A sample is a 1-d tensor/list of token ids (labels: the tokens shifted left by one, next-token
    LM), an ``(x, y)`` pair of 1-d sequences (labels ``y``, which must be as long as ``x``), or a dict
    with ``"input_ids"`` or ``"tokens"`` (and optionally ``"labels"``). ``max_len`` truncates longer
    samples (the sampler's ``oversize="truncate"``); for shifted labels the last kept position still
    predicts the next token of the original sequence.
    """
    if not samples:
        raise ValueError("pad_collate: empty batch")
    pairs = [_split_sample(s, label_pad) for s in samples]
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"pad_collate: max_len must be >= 1, got {max_len}")
        pairs = [(x[:max_len], y[:max_len]) for x, y in pairs]
    for i, (x, y) in enumerate(pairs):
        if x.shape != y.shape:
            raise ValueError(
                f"pad_collate: sample {i} has {x.numel()} inputs but {y.numel()} labels; they must match"
            )
    T = max(1, max(x.numel() for x, _ in pairs))
    B = len(pairs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), label_pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        n = x.numel()
        input_ids[i, :n] = x
        labels[i, :n] = y
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class PadCollate:
    """:func:`pad_collate` with fixed options, as a picklable ``collate_fn`` for DataLoader workers."""

    def __init__(self, *, pad_id: int = 0, label_pad: int = -100, max_len: int | None = None) -> None:
        self.pad_id, self.label_pad, self.max_len = pad_id, label_pad, max_len

    def __call__(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        return pad_collate(samples, pad_id=self.pad_id, label_pad=self.label_pad, max_len=self.max_len)


# ------------------------------------------------------------------------------------------------ packing


class PackedBlocks(torch.utils.data.Dataset):
    """Documents concatenated into blocks of ``block_len`` tokens (a map-style Dataset).

    Block ``i`` holds stream tokens ``[i * block_len, (i + 1) * block_len)``; its labels are the next
    stream tokens, except where the next token belongs to another document (-100: no token predicts
    across a boundary). A document cut by a block boundary continues in the next block as a new
    segment (positions restart at 0). With ``drop_last=False`` the last, partial block is padded with
    ``pad_id`` (document id -1, label -100, ``attention_mask`` 0).

    Each item is a dict of 1-d int64 tensors: ``input_ids``, ``labels``, ``position_ids``,
    ``document_ids`` (per block, numbered from 0 in order of appearance) and ``attention_mask``.
    """

    def __init__(
        self,
        documents: Sequence[Any],
        block_len: int,
        *,
        drop_last: bool = True,
        pad_id: int = 0,
        label_pad: int = -100,
    ) -> None:
        if block_len < 1:
            raise ValueError(f"PackedBlocks: block_len must be >= 1, got {block_len}")
        docs = [_as_1d(d, f"document {i}") for i, d in enumerate(documents)]
        docs = [d for d in docs if d.numel()]
        if not docs:
            raise ValueError("PackedBlocks: no non-empty documents")
        self.tokens = torch.cat(docs)
        self.doc = torch.cat([torch.full((d.numel(),), i, dtype=torch.long) for i, d in enumerate(docs)])
        self.block_len, self.pad_id, self.label_pad = block_len, pad_id, label_pad
        n = self.tokens.numel()
        self.n_blocks = n // block_len if drop_last else -(-n // block_len)
        if self.n_blocks == 0:
            raise ValueError(
                f"PackedBlocks: {n} tokens do not fill one block of {block_len} (drop_last=True)"
            )

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n_blocks <= i < self.n_blocks:
            raise IndexError(i)
        i %= self.n_blocks
        T = self.block_len
        start = i * T
        x = self.tokens[start : start + T]
        doc = self.doc[start : start + T]
        nxt_tok = self.tokens[start + 1 : start + T + 1]
        nxt_doc = self.doc[start + 1 : start + T + 1]
        n = x.numel()
        labels = torch.full((T,), self.label_pad, dtype=torch.long)
        m = nxt_tok.numel()  # n - 1 at the very end of the stream
        labels[:m] = torch.where(nxt_doc == doc[:m], nxt_tok, torch.tensor(self.label_pad))
        input_ids = torch.full((T,), self.pad_id, dtype=torch.long)
        input_ids[:n] = x
        doc_ids = torch.full((T,), -1, dtype=torch.long)
        doc_ids[:n] = doc - doc[0]  # renumber from 0 inside the block
        # Positions restart at every document: t - (start of t's segment).
        t = torch.arange(T)
        new_seg = torch.ones(T, dtype=torch.bool)
        new_seg[1:] = doc_ids[1:] != doc_ids[:-1]
        seg_start = torch.cummax(torch.where(new_seg, t, torch.zeros_like(t)), 0).values
        position_ids = t - seg_start
        mask = torch.zeros(T, dtype=torch.long)
        mask[:n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "document_ids": doc_ids,
            "attention_mask": mask,
        }


def packed_collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack :class:`PackedBlocks` items into ``(B, T)`` tensors (same keys)."""
    if not items:
        raise ValueError("packed_collate: empty batch")
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}


def block_causal_mask(document_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T, T)`` bool: query ``q`` may attend key ``k`` iff ``k <= q``, same document, ``k`` real.

    Every position may attend itself, so padded rows stay finite under softmax.

    >>> block_causal_mask(torch.tensor([[0, 0, 1]])).int().tolist()
    [[[1, 0, 0], [1, 1, 0], [0, 0, 1]]]
    """
    if document_ids.ndim == 1:
        document_ids = document_ids.unsqueeze(0)
    B, T = document_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    allowed = causal & same
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=document_ids.device)
    return allowed | eye
