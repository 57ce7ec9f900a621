"""Training: :func:`fit` (one readable loop) and the parts it composes, each usable on its own."""

from torchkiln.train.activation_checkpointing import (
    apply_activation_checkpointing,
    find_blocks,
    remove_activation_checkpointing,
)
from torchkiln.train.checkpoint import atomic_save, load_checkpoint, unwrap_model
from torchkiln.train.loop import FitResult, evaluate, fit, latest_checkpoint, make_loader
from torchkiln.train.loss import LossComputer
from torchkiln.train.optim import build_optimizer, split_decay_params
from torchkiln.train.precision import Precision
from torchkiln.train.sampling import EpochBatchSampler
from torchkiln.train.schedule import cycle_position, lr_at, set_lr

__all__ = [
    "EpochBatchSampler",
    "FitResult",
    "LossComputer",
    "Precision",
    "apply_activation_checkpointing",
    "atomic_save",
    "build_optimizer",
    "cycle_position",
    "evaluate",
    "find_blocks",
    "fit",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "make_loader",
    "remove_activation_checkpointing",
    "set_lr",
    "split_decay_params",
    "unwrap_model",
]
