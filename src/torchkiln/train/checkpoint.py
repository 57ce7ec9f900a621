"""Training checkpoints: written atomically, loaded with ``weights_only=True``, complete enough to resume
mid-epoch exactly (model, optimizer, scaler, EMA, step/epoch/batch position, RNG states).

>>> import torch, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
>>> atomic_save({"w": torch.ones(2)}, path)
>>> load_checkpoint(path)["w"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchkiln.errors import CheckpointError

FORMAT_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The original module under torch.compile (``_orig_mod``), DDP/DataParallel (``module``) wrappers."""
    seen = 0
    while seen < 10:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs), with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure means a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), py[-1]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_format(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a torchkiln training checkpoint of format {FORMAT_VERSION} (found {version!r})"
        )


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load weights into the original module, naming the missing/unexpected keys on mismatch."""
    target = unwrap_model(model)
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).split("\n", 1)[-1].strip()
        raise CheckpointError(f"checkpoint {path} does not match {type(target).__name__}: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match {type(target).__name__}: "
            f"missing keys {result.missing_keys[:8]}, unexpected keys {result.unexpected_keys[:8]}"
        )


# ----------------------------------------------------------------------------------------------- distributed
#
# Layout of a checkpoint written by several ranks (``step-N`` below is ``step-00000012`` etc.):
#
#   step-N.pt           rank 0, written last: schedule/sampler position, losses, config, rank 0's RNG;
#                       under DDP also the full model and optimizer (replicated, so one copy suffices)
#   step-N.ranks/       rank-R.pt from every other rank R: its RNG states (its own dropout stream)
#   step-N.dcp/         FSDP only: model and optimizer shards, torch.distributed.checkpoint format;
#                       loadable on any number of ranks, including one process without a process group
#
# ``step-N.pt`` appears (atomically) only after every rank has written its part, so the newest
# ``step-*.pt`` is always a complete checkpoint.


def rank_parts_dir(path: str | os.PathLike) -> Path:
    """Where the other ranks' parts of checkpoint ``path`` live (``step-N.ranks/``)."""
    path = Path(path)
    return path.with_name(path.stem + ".ranks")


def sharded_dir(path: str | os.PathLike) -> Path:
    """Where an FSDP checkpoint's DCP shards live (``step-N.dcp/``)."""
    path = Path(path)
    return path.with_name(path.stem + ".dcp")


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete checkpoint ``path`` and its rank parts and shards, if any."""
    import shutil

    path = Path(path)
    path.unlink(missing_ok=True)
    for extra in (rank_parts_dir(path), sharded_dir(path)):
        shutil.rmtree(extra, ignore_errors=True)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Every rank writes its shard of model and optimizer with ``torch.distributed.checkpoint``
    (a collective: all ranks call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Load DCP shards written by any number of ranks into ``model``/``optimizer`` (FSDP-sharded, DDP or
    a plain module in one process: DCP reshards to whatever layout ``model`` has now)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"sharded checkpoint directory not found: {directory}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        try:
            dcp.load(state, checkpoint_id=str(directory))
        except Exception as exc:  # noqa: BLE001 - a missing key or shape mismatch: name the checkpoint
            raise CheckpointError(
                f"sharded checkpoint {directory} does not match {type(unwrap_model(model)).__name__} "
                f"and its optimizer: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400]}"
            ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unprefixed ``state_dict`` as plain CPU tensors; for FSDP gathered from the shards
    (a collective: every rank calls it; under FSDP the result is complete on rank 0 only)."""
    from torchkiln.train.distributed import is_fsdp

    original = unwrap_model(model)
    if not is_fsdp(original):
        return original.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(original, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
