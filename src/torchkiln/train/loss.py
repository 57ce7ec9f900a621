"""Batches and losses: split a batch into model inputs and target, count what the loss averages over,
and compute each micro-batch's share of the window's loss.

Under gradient accumulation the loss of a window is normalized by the true count across the whole
window (samples, or non-ignored tokens for token-level losses), so k micro-batches of B give the same
gradient as one batch of k*B, including a short last window and micro-batches with different numbers
of real tokens. Averaging per-micro-batch means and dividing by k (the usual snippet) does not.

>>> import torch
>>> lc = LossComputer("cross_entropy")
>>> logits, target = torch.zeros(2, 3, 5), torch.tensor([[1, 2, -100], [0, -100, -100]])
>>> lc.count(target, {})
3
>>> round(float(lc.window_share(logits, target, window_total=3)), 4)   # mean over the 3 real tokens
1.6094
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def output_loss(output: Any) -> torch.Tensor:
    """The loss a model returned: a scalar tensor, ``output.loss`` or ``output['loss']``."""
    if isinstance(output, torch.Tensor) and output.ndim == 0:
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        if output[0].ndim == 0:
            loss = output[0]
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(
            "loss='model' needs the model to return a scalar loss (or an object with .loss / ['loss']), "
            f"got {type(output).__name__}; pass labels in the batch or set train.loss = 'cross_entropy'"
        )
    return loss


def output_logits(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    return logits if isinstance(logits, torch.Tensor) else None


def _is_causal_lm(model: Any) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


class LossComputer:
    """Splits batches and computes losses for one loss specification.

    ``loss``: ``'cross_entropy'``, ``'mse'``, ``'model'`` (the model returns the loss, as Hugging Face
    models do when given ``labels``) or a callable ``fn(output, target) -> mean loss``.
    """

    def __init__(
        self,
        loss: str | Callable[..., torch.Tensor],
        *,
        loss_count: str = "auto",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        model: Any = None,
    ) -> None:
        self.kind = loss if isinstance(loss, str) else "callable"
        if self.kind not in ("cross_entropy", "mse", "model", "callable"):
            raise ValueError(f"unknown loss {loss!r}; use cross_entropy, mse, model or a callable")
        self.fn = loss if callable(loss) else None
        self.loss_count = loss_count
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        # HF causal LMs shift labels inside forward: the loss averages over labels[..., 1:].
        self.shift_labels = _is_causal_lm(model)

    # ------------------------------------------------------------------------------------------ batches

    def split(self, batch: Any) -> tuple[tuple, dict[str, Any], Any]:
        """``(args, kwargs, target)`` for ``model(*args, **kwargs)`` and the loss."""
        if isinstance(batch, Mapping):
            kwargs = dict(batch)
            if self.kind == "model":
                target = next((kwargs[k] for k in TARGET_KEYS if k in kwargs), None)
                return (), kwargs, target
            for key in TARGET_KEYS:
                if key in kwargs:
                    return (), kwargs, kwargs.pop(key)
            raise ValueError(
                f"dict batch has no target key (looked for {', '.join(TARGET_KEYS)}; keys: {sorted(batch)}); "
                "add one, or use loss='model' if the model computes its own loss"
            )
        if isinstance(batch, torch.Tensor):
            return (batch,), {}, None
        if isinstance(batch, (tuple, list)):
            if self.kind == "model" or len(batch) == 1:
                return tuple(batch), {}, None
            return tuple(batch[:-1]), {}, batch[-1]
        raise TypeError(f"unsupported batch type {type(batch).__name__}; use a tensor, tuple/list or dict")

    def count(self, target: Any, kwargs: Mapping[str, Any], args: tuple = ()) -> int:
        """How many items this micro-batch's loss averages over (computed on the host, before forward)."""
        mode = self.loss_count
        if isinstance(target, torch.Tensor):
            token_level = target.ndim >= 2 and not target.is_floating_point()
            if self.kind == "cross_entropy" or (mode == "tokens") or (mode == "auto" and token_level):
                if target.is_floating_point():  # soft targets: one per sample
                    return int(target.shape[0])
                t = target[..., 1:] if (self.shift_labels and target.ndim >= 2) else target
                return int((t != self.ignore_index).sum())
            if self.kind == "mse":
                return int(target.numel())
            return int(target.shape[0]) if target.ndim else 1
        # No target: count samples from the first tensor input.
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.ndim:
                return int(value.shape[0])
        return 1

    # ------------------------------------------------------------------------------------------ losses

    def mean(self, output: Any, target: Any) -> torch.Tensor:
        """The micro-batch's own mean loss (what a window of one micro-batch needs; no counting)."""
        if self.kind == "cross_entropy":
            logits = output_logits(output)
            if logits is None:
                raise TypeError(f"cross_entropy needs logits from the model, got {type(output).__name__}")
            if target is None:
                raise ValueError("cross_entropy needs a target in the batch")
            if target.is_floating_point() or (logits.ndim == 2 and target.ndim == 1):
                return F.cross_entropy(
                    logits.float(),
                    target,
                    ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing,
                )
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                target.reshape(-1),
                ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing,
            )
        if self.kind == "mse":
            pred = output_logits(output)
            if pred is None or target is None:
                raise ValueError("mse needs a tensor output and a target")
            return F.mse_loss(pred.float().reshape(target.shape), target.float())
        mean = output_loss(output) if self.kind == "model" else self.fn(output, target)
        if not isinstance(mean, torch.Tensor) or mean.ndim != 0:
            raise TypeError(f"the loss function must return a scalar tensor, got {type(mean).__name__}")
        return mean.float()

    def window_share(
        self, output: Any, target: Any, window_total: int, count: int | None = None
    ) -> torch.Tensor:
        """This micro-batch's contribution to the window loss: (sum of its item losses) / window_total."""
        if self.kind == "cross_entropy":
            logits = output_logits(output)
            if logits is None:
                raise TypeError(f"cross_entropy needs logits from the model, got {type(output).__name__}")
            if target is None:
                raise ValueError("cross_entropy needs a target in the batch")
            if target.is_floating_point():  # probabilities / soft labels, shape like logits
                total = F.cross_entropy(
                    logits.float(), target, reduction="sum", label_smoothing=self.label_smoothing
                )
            else:
                total = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    target.reshape(-1),
                    ignore_index=self.ignore_index,
                    reduction="sum",
                    label_smoothing=self.label_smoothing,
                )
            return total / window_total
        if self.kind == "mse":
            pred = output_logits(output)
            if pred is None or target is None:
                raise ValueError("mse needs a tensor output and a target")
            return (
                F.mse_loss(pred.float().reshape(target.shape), target.float(), reduction="sum") / window_total
            )
        if count is None:
            raise ValueError("count is required for model/callable losses")
        if count == 0:
            return torch.zeros((), device=_device_of(output))
        mean = output_loss(output) if self.kind == "model" else self.fn(output, target)
        if not isinstance(mean, torch.Tensor) or mean.ndim != 0:
            raise TypeError(f"the loss function must return a scalar tensor, got {type(mean).__name__}")
        # A mean over `count` items, re-weighted to a share of the window's mean.
        return mean.float() * (count / window_total)


def _device_of(output: Any) -> torch.device:
    t = output if isinstance(output, torch.Tensor) else output_logits(output)
    return t.device if t is not None else torch.device("cpu")


def move_to(
    batch: Any, device: torch.device, *, channels_last: bool = False, non_blocking: bool = False
) -> Any:
    """Move every tensor in a (nested) batch to ``device``; 4-d float tensors to channels_last if asked."""
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=non_blocking)
        if channels_last and t.ndim == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(batch, Mapping):
        return {
            k: move_to(v, device, channels_last=channels_last, non_blocking=non_blocking)
            for k, v in batch.items()
        }
    if isinstance(batch, (tuple, list)):
        return type(batch)(
            move_to(v, device, channels_last=channels_last, non_blocking=non_blocking) for v in batch
        )
    return batch


def batch_sizes(args: tuple, kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(samples, tokens computed, real tokens)`` of a batch; tokens are 0 when inputs are not sequences."""
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim), None)
    if first is None:
        return 1, 0, 0
    samples = int(first.shape[0])
    ids = kwargs.get("input_ids", first)
    if isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point():
        tokens = int(ids.numel())
        mask = kwargs.get("attention_mask")
        real = int(mask.sum()) if isinstance(mask, torch.Tensor) else tokens
        return samples, tokens, real
    return samples, 0, 0
