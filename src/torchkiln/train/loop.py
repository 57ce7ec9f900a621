"""``fit()``: the training loop, in one file that reads top to bottom.

Everything that makes it fast (mixed precision, fused optimizers, torch.compile, channels_last,
activation checkpointing) is switched on by the config; everything that makes it correct is always on:

* under accumulation the window's loss is normalized by the true count across the window;
* fp16: unscale once after the last micro-batch, clip, step, update; a skipped step does not advance
  the schedule;
* the learning rate is a pure function of the optimizer-step count;
* checkpoints are atomic and hold everything needed to resume mid-epoch with identical losses.

Under torchrun (``kiln train --nproc-per-node N``) the same loop runs on every rank: DDP or FSDP2
wraps the model (train/distributed.py), each rank sees its own disjoint part of every global batch
(equal batch counts, or collectives would hang), the window's loss is normalized by the item count
summed over ranks, and only rank 0 prints and writes logs. Not launched, none of that code runs.

>>> import torch, torchkiln as tk
>>> data = tk.create_dataset("synthetic", "train", task="classification", n=64, features=8, num_classes=3)
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> result = tk.fit(model, data, batch_size=16, epochs=2, lr=1e-2, progress="off", flops=False)
>>> result.steps, len(result.losses)
(8, 8)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchkiln.errors import CheckpointError, NonFiniteLossError, RecipeError
from torchkiln.recipe import TrainConfig, train_config
from torchkiln.train import checkpoint as ckpt_io
from torchkiln.train import distributed
from torchkiln.train.activation_checkpointing import (
    apply_activation_checkpointing,
    remove_activation_checkpointing,
)
from torchkiln.train.ema import BatchNormRefresher, has_batchnorm
from torchkiln.train.loss import LossComputer, batch_sizes, move_to, output_logits
from torchkiln.train.monitor import Monitor
from torchkiln.train.optim import build_optimizer
from torchkiln.train.pipeline import SPLIT_ATTR
from torchkiln.train.precision import Precision, sdpa_context
from torchkiln.train.sampling import EpochBatchSampler
from torchkiln.train.schedule import set_lr


@dataclass
class FitResult:
    """What :func:`fit` returns. ``model`` is the original module (with EMA weights when EMA is on)."""

    model: nn.Module
    steps: int = 0
    skipped_steps: int = 0
    nonfinite_losses: int = 0
    epochs_completed: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    train_time_s: float = 0.0
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    padding_efficiency: float | None = None
    flops_per_sample: float | None = None
    flops_per_step: float | None = None
    achieved_flops_per_s: float | None = None
    peak_flops_per_s: float | None = None
    mfu: float | None = None
    uncounted_ops: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    out_dir: str | None = None
    run_id: str | None = None
    world_size: int = 1  # processes that trained; samples_per_s/tokens_per_s are the whole job's
    strategy: str = "none"

    def summary(self) -> dict[str, Any]:
        keys = (
            "steps",
            "skipped_steps",
            "nonfinite_losses",
            "epochs_completed",
            "stopped_early",
            "train_time_s",
            "samples_per_s",
            "tokens_per_s",
            "flops_per_step",
            "mfu",
            "last_checkpoint",
            "world_size",
            "strategy",
        )
        out = {k: getattr(self, k) for k in keys}
        out["final_loss"] = self.losses[-1] if self.losses else None
        out.update(self.val_metrics)
        return out


@dataclass
class _State:
    step: int = 0  # optimizer steps taken (drives the schedule)
    skipped: int = 0  # fp16 steps skipped by the scaler
    nonfinite: int = 0
    nonfinite_in_row: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    best: float | None = None
    bad_evals: int = 0


# ---------------------------------------------------------------------------------------------------- helpers


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"train.device={name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def _resolve_loss(loss: str | Callable | None, cfg: TrainConfig) -> str | Callable:
    spec = loss if loss is not None else cfg.loss
    if isinstance(spec, str) and ":" in spec:
        from torchkiln.zoo import load_reference

        fn = load_reference(spec, what="loss function")
        if not callable(fn):
            raise RecipeError(f"train.loss={spec!r} is not callable")
        return fn
    return spec


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(
    data: Dataset | DataLoader | Iterable,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader | Iterable:
    """A DataLoader over ``data`` with an :class:`EpochBatchSampler` (resumable; sharded across
    ``num_replicas`` ranks when more than one); loaders pass through."""
    if isinstance(data, DataLoader) or not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        return data
    sampler = EpochBatchSampler(
        len(data),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        num_replicas=num_replicas,
        rank=rank,
    )
    if collate_fn is None:
        # Indexed datasets gather a whole batch in one __getitems__ call; their collate keeps it as is.
        collate_fn = getattr(data, "default_collate_fn", None)
    return DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


def _sampler_of(loader: Any) -> Any:
    return getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)


def _set_epoch(loader: Any, epoch: int) -> None:
    for obj in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _epoch_iterator(loader: Any, skip: int) -> Iterable:
    """Iterate ``loader`` starting ``skip`` batches in: free for resumable samplers, else by discarding."""
    sampler = getattr(loader, "batch_sampler", None)
    if skip and sampler is not None and hasattr(sampler, "skip"):
        sampler.skip(skip)
        return iter(loader)
    it = iter(loader)
    for _ in range(skip):  # a user's loader: replay and discard (same order thanks to the restored RNG)
        next(it, None)
    return it


def _len_or_none(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest ``step-*.pt`` in ``out_dir/checkpoints`` (what ``--resume auto`` picks)."""
    found = sorted(p for p in _checkpoint_dir(Path(out_dir)).glob("step-*.pt") if p.is_file())
    return found[-1] if found else None


# -------------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable,
    *,
    loss: str | Callable = "cross_entropy",
    precision: str = "fp32",
    device: str | torch.device | None = None,
    batch_size: int = 256,
    ignore_index: int = -100,
    max_batches: int | None = None,
    channels_last: bool = False,
    dist: distributed.DistContext | None = None,
) -> dict[str, float]:
    """Mean loss over every item of ``data``, plus accuracy (classification) and perplexity (token-level).

    ``dist`` (fit passes it under torchrun): each rank evaluates its own batches (``max_batches`` then
    counts per rank, rounded up from ``max_batches / world``) and the sums and counts are all-reduced,
    so every rank gets the metrics of the whole data set.

    >>> import torch, torchkiln as tk
    >>> data = tk.create_dataset("synthetic", "val", task="classification", n=32, features=4, num_classes=2)
    >>> sorted(tk.evaluate(torch.nn.Linear(4, 2), data))
    ['val_accuracy', 'val_items', 'val_loss']
    """
    first_param = next(iter(model.parameters()), None)
    dev = (
        torch.device(device)
        if device is not None
        else (first_param.device if first_param is not None else torch.device("cpu"))
    )
    computer = LossComputer(loss, ignore_index=ignore_index, model=model)
    prec = Precision(precision, dev.type)
    loader = make_loader(data, batch_size=batch_size, shuffle=False, seed=0)
    lockstep = 0  # FSDP: forwards every rank must run (each forward all-gathers weights with the others)
    if dist is not None:
        unsharded = loader
        loader = distributed.shard_loader(loader, dist, seed=0, equal=False)
        if max_batches is not None:
            max_batches = -(-max_batches // dist.world_size)
        if dist.strategy == "fsdp":
            lockstep = -(-len(loader.batch_sampler.inner) // dist.world_size)
            lockstep = min(lockstep, max_batches) if max_batches is not None else lockstep
    was_training = model.training
    model.eval()
    total_loss, total_items, correct, token_level, has_acc = 0.0, 0, 0, False, False
    forwards = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            args, kwargs, target = computer.split(batch)
            count = computer.count(target, kwargs, args)
            if count == 0 and not lockstep:
                continue
            forwards += 1
            args, kwargs, target = move_to((args, kwargs, target), dev, channels_last=channels_last)
            with prec.autocast():
                out = model(*args, **kwargs)
                share = computer.window_share(out, target, count, count) if count else None
            if share is None:
                continue  # (FSDP lockstep) a forward with no items to count
            total_loss += float(share) * count  # share: the mean over this batch
            total_items += count
            logits = output_logits(out)
            if isinstance(target, torch.Tensor) and not target.is_floating_point() and logits is not None:
                t = target
                if computer.shift_labels and t.ndim >= 2:
                    logits, t = logits[..., :-1, :], t[..., 1:]
                if logits.shape[:-1] == t.shape:
                    token_level = token_level or t.ndim >= 2
                    has_acc = True
                    mask = t != ignore_index
                    correct += int(((logits.argmax(-1) == t) & mask).sum())
        if forwards < lockstep:  # this rank has fewer batches: forwards whose results are dropped
            args, kwargs, _ = computer.split(next(iter(unsharded)))
            args, kwargs = move_to((args, kwargs), dev, channels_last=channels_last)
            for _ in range(lockstep - forwards):
                with prec.autocast():
                    model(*args, **kwargs)
    finally:
        model.train(was_training)
    if dist is not None:  # sums and counts over ranks, not a mean of per-rank means
        sums = dist.all_sum([total_loss, total_items, correct, float(token_level), float(has_acc)])
        total_loss, total_items, correct = sums[0], int(sums[1]), int(sums[2])
        token_level, has_acc = sums[3] > 0, sums[4] > 0
    if total_items == 0:
        raise ValueError("evaluation data produced no items (empty dataset, or every target is ignore_index)")
    mean = total_loss / total_items
    metrics = {"val_loss": mean, "val_items": float(total_items)}
    if has_acc:
        metrics["val_accuracy"] = correct / total_items
    if token_level:
        metrics["val_perplexity"] = math.exp(min(mean, 50.0))
    return metrics


# ---------------------------------------------------------------------------------------------------- fit


def fit(
    model: nn.Module,
    train_data: Dataset | DataLoader | Iterable,
    val_data: Dataset | DataLoader | Iterable | None = None,
    *,
    config: TrainConfig | None = None,
    loss_fn: str | Callable | None = None,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    resume: str | Path | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    **overrides: Any,
) -> FitResult:
    """Train ``model`` on ``train_data`` (a Dataset, a DataLoader or any iterable of batches).

    ``config`` is a :class:`~torchkiln.recipe.TrainConfig`; keyword ``overrides`` (``lr=3e-4``,
    ``precision="bf16"``, ``schedule={"name": "cosine", "warmup_steps": 100}``...) update it.
    Batches are tuples ``(inputs..., target)`` or dicts (target under ``labels``/``target``/``y``, or
    ``loss="model"`` when the model returns its own loss). ``resume`` is a checkpoint path or ``"auto"``
    (the newest in ``out_dir``).

    Under torchrun, ``batch_size`` is per rank and ``strategy`` (``auto``/``ddp``/``fsdp``) says how
    the model is replicated or sharded; see :mod:`torchkiln.train.distributed`.
    """
    cfg = _merge_config(config, overrides)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Launched by torchrun: join the process group (each collective times out after dist_timeout_s).
    # In one process `dist` is None and none of the distributed code below runs.
    dist = distributed.setup(
        cfg.device, backend=cfg.dist_backend, timeout_s=cfg.dist_timeout_s, strategy=cfg.strategy
    )
    if dist is not None:
        dist.strategy = distributed.resolve_strategy(
            cfg.strategy, model, dist.world_size, cfg.fsdp.auto_above_params
        )
        if dist.strategy == "none":  # a process group of one: train as a single process
            dist = None
    device = dist.device if dist is not None else _resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if dist is not None and resume is None and dist.restart_count and out_dir is not None:
        resume = "auto"  # an elastic restart (torchrun --max-restarts) continues from the newest checkpoint
    resume_path = _resolve_resume(resume, out_dir)
    if resume_path is None:
        # Every rank its own stream (dropout masks differ per rank); rank 0 draws what one process would.
        _seed_everything(cfg.seed + (dist.rank if dist is not None else 0))

    # --- the model: the original module is what we save; `run_model` is what we call ---------------
    original = ckpt_io.unwrap_model(model)
    split = getattr(original, SPLIT_ATTR, None)  # placed on several devices by train/pipeline.py
    if split is None:
        model.to(device)
    else:  # keep the placement; batches go to the first stage's device
        device = split.first_device
    if cfg.channels_last:
        original.to(memory_format=torch.channels_last)
    if cfg.activation_checkpointing is not None and cfg.activation_checkpointing.enabled:
        ac = cfg.activation_checkpointing
        apply_activation_checkpointing(original, modules=ac.modules, every=ac.every)
    if dist is not None:
        _check_distributed(cfg, dist)
        # DDP wraps `original` (which stays what we save); FSDP2 shards `original` in place.
        model = distributed.wrap_model(model, dist, cfg.fsdp)
    ema = None
    if cfg.ema is not None and cfg.ema.enabled:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(original, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema.decay), use_buffers=True)
    # Averaged weights do not match averaged BatchNorm statistics: re-estimate those before each evaluation
    # and at the end, from the last few training micro-batches (see train/ema.py).
    bn_refresher = None
    if ema is not None and cfg.ema.bn_batches and has_batchnorm(original):
        bn_refresher = BatchNormRefresher(cfg.ema.bn_batches)
    run_model: nn.Module = model
    if cfg.compile is not None and cfg.compile.enabled:
        c = cfg.compile
        run_model = torch.compile(model, mode=c.mode, dynamic=c.dynamic, fullgraph=c.fullgraph)

    loss = LossComputer(
        _resolve_loss(loss_fn, cfg),
        loss_count=cfg.loss_count,
        ignore_index=cfg.ignore_index,
        label_smoothing=cfg.label_smoothing,
        model=original,
    )
    opt_cfg = cfg.optimizer
    if dist is not None and dist.strategy == "fsdp" and opt_cfg.implementation == "auto":
        # Fused optimizer kernels have no sharding rule for FSDP's DTensor parameters; foreach does.
        opt_cfg = opt_cfg.model_copy(update={"implementation": "foreach"})
    optimizer = build_optimizer(original, opt_cfg, lr=cfg.lr, weight_decay=cfg.weight_decay)
    precision = Precision(cfg.precision, device.type)
    pin = device.type == "cuda"
    loader = make_loader(
        train_data,
        batch_size=batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=num_workers,
        pin_memory=pin,
        collate_fn=collate_fn,
        num_replicas=dist.world_size if dist is not None else 1,
        rank=dist.rank if dist is not None else 0,
    )
    if dist is not None and loader is train_data:  # a DataLoader fit did not build: shard its batches
        loader = distributed.shard_loader(loader, dist, seed=cfg.seed, equal=True)
    val_loader = None
    if val_data is not None:
        val_loader = make_loader(
            val_data,
            batch_size=eval_batch_size or batch_size,
            shuffle=False,
            seed=0,
            num_workers=num_workers,
            collate_fn=collate_fn,
        )

    micro_per_epoch = _len_or_none(loader)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.accumulate) if micro_per_epoch is not None else None
    if steps_per_epoch == 0:
        raise ValueError("the training data is empty")
    total_steps = cfg.max_steps
    if steps_per_epoch is not None:
        total_steps = min(total_steps or 10**18, cfg.epochs * steps_per_epoch)
    if total_steps is None:
        if cfg.schedule.name == "cosine":
            raise RecipeError(
                "the cosine schedule needs a known length: set train.max_steps for iterable data"
            )
        total_steps = 0

    state = _State()
    result = FitResult(model=original, out_dir=str(out_dir) if out_dir else None)
    resume_rng = None
    if dist is not None:
        result.world_size, result.strategy = dist.world_size, dist.strategy
    if resume_path is not None:
        resume_rng = _restore(
            resume_path, original, optimizer, precision, ema, loader, state, result, dist, cfg.seed
        )

    main = dist is None or dist.is_main  # only rank 0 prints and writes logs, history and model.pt
    monitor = Monitor(
        total_steps=total_steps or 0,
        out_dir=out_dir if main else None,
        progress=cfg.progress if main else "off",
        tensorboard=cfg.tensorboard and main,
        description=type(original).__name__,
    )
    monitor.advance_to(state.step)
    sample_count = token_count = real_token_count = 0
    timed_s = 0.0
    first_window_done = False
    run_model.train()
    optimizer.zero_grad(set_to_none=True)

    def log(record: dict[str, Any]) -> None:
        monitor.log(record)
        for cb in callbacks:
            cb(record)

    # A callback may also define on_step(step, model), run after every optimizer step (gradual pruning
    # changes the model between steps), and on_train_end(model), run once before the final save.
    step_hooks = [cb.on_step for cb in callbacks if callable(getattr(cb, "on_step", None))]

    done_at = {"eval": -1, "checkpoint": -1}  # the step of the latest evaluation / checkpoint

    def save_checkpoint(epoch_end: bool) -> None:
        if out_dir is None:
            return
        done_at["checkpoint"] = state.step
        path = _checkpoint_dir(out_dir) / f"step-{state.step:08d}.pt"
        sharded = dist is not None and dist.strategy == "fsdp"
        if dist is not None:
            # Every rank writes its part (RNG; FSDP: its shards), then rank 0 the file that completes it.
            if sharded:
                ckpt_io.save_sharded(original, optimizer, ckpt_io.sharded_dir(path))
            if not main:
                rng_part = {
                    "rng": ckpt_io.rng_state(),
                    "rng_epoch_start": None if epoch_end else rng_epoch_start,
                }
                ckpt_io.atomic_save(rng_part, ckpt_io.rank_parts_dir(path) / f"rank-{dist.rank}.pt")
            dist.barrier()
            if not main:
                result.last_checkpoint = str(path)
                return
        ckpt_io.atomic_save(
            {
                "format_version": ckpt_io.FORMAT_VERSION,
                "model": None if sharded else original.state_dict(),
                "optimizer": None if sharded else optimizer.state_dict(),
                "sharded": ckpt_io.sharded_dir(path).name if sharded else None,
                "world_size": dist.world_size if dist is not None else 1,
                "batch_size": batch_size,
                "scaler": precision.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "state": {
                    "step": state.step,
                    "skipped": state.skipped,
                    "nonfinite": state.nonfinite,
                    "epoch": state.epoch + 1 if epoch_end else state.epoch,
                    "batch_in_epoch": 0 if epoch_end else state.batch_in_epoch,
                    "best": state.best,
                    "bad_evals": state.bad_evals,
                },
                "rng": ckpt_io.rng_state(),
                "rng_epoch_start": None if epoch_end else rng_epoch_start,
                "losses": list(result.losses),
                "lrs": list(result.lrs),
                "config": cfg.model_dump(mode="json"),
            },
            path,
        )
        result.last_checkpoint = str(path)
        for old in sorted(p for p in _checkpoint_dir(out_dir).glob("step-*.pt") if p.is_file())[
            : -cfg.keep_checkpoints
        ]:
            ckpt_io.remove_checkpoint(old)

    def run_eval() -> bool:
        """Evaluate; return True when early stopping says stop."""
        if val_loader is None:
            return False
        done_at["eval"] = state.step
        eval_model = ema.module if ema is not None else run_model
        if bn_refresher is not None:
            bn_refresher.refresh(ema.module, precision.autocast)
        metrics = evaluate(
            eval_model,
            val_loader,
            loss=loss.fn or loss.kind,
            precision=cfg.precision,
            device=device,
            ignore_index=cfg.ignore_index,
            channels_last=cfg.channels_last,
            max_batches=cfg.eval_batches,
            dist=dist,
        )
        metrics = {k: v for k, v in metrics.items() if k != "val_items"}
        result.val_metrics = metrics
        result.val_history.append({"step": state.step, "epoch": state.epoch, **metrics})
        log({"step": state.step, "epoch": state.epoch, **metrics})
        monitor.print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  (step {state.step})")
        es = cfg.early_stopping
        if es is None:
            return False
        if es.metric not in metrics:
            raise RecipeError(f"early_stopping.metric={es.metric!r} but evaluation gives {sorted(metrics)}")
        value = metrics[es.metric]
        mode = es.mode if es.mode != "auto" else ("max" if es.metric == "val_accuracy" else "min")
        better = state.best is None or (
            value < state.best - es.min_delta if mode == "min" else value > state.best + es.min_delta
        )
        if better:
            state.best, state.bad_evals = value, 0
            return False
        state.bad_evals += 1
        return state.bad_evals >= es.patience

    stop = False
    rng_epoch_start = None
    # Per-step constants, resolved once: the step itself should cost what a hand-written loop costs.
    # (Distributed: every micro-batch is normalized by the count over all ranks, so no shortcut.)
    single = cfg.accumulate == 1 and dist is None
    needs_move = device.type != "cpu" or cfg.channels_last
    no_sync = getattr(model, "no_sync", None) if dist is None else distributed.no_sync_context(model)

    sdpa_default = isinstance(
        sdpa_context(cfg.sdpa_backend, cfg.precision, device.type), contextlib.nullcontext
    )

    def sdpa_ctx() -> contextlib.AbstractContextManager:
        if sdpa_default:
            return contextlib.nullcontext()
        return sdpa_context(cfg.sdpa_backend, cfg.precision, device.type)

    try:
        while state.epoch < cfg.epochs and not stop:
            _set_epoch(loader, state.epoch)
            if resume_rng is not None and state.batch_in_epoch:
                # Replay the epoch's start exactly (its shuffle, its workers' seeds), then jump to the
                # checkpoint's position and restore the RNG as it was there.
                rng_epoch_start = resume_rng["epoch_start"]
                ckpt_io.set_rng_state(rng_epoch_start)
                it = _epoch_iterator(loader, state.batch_in_epoch)
                ckpt_io.set_rng_state(resume_rng["now"])
            else:
                if resume_rng is not None:
                    ckpt_io.set_rng_state(resume_rng["now"])
                state.batch_in_epoch = 0
                rng_epoch_start = ckpt_io.rng_state()
                it = iter(loader)
            resume_rng = None

            while not stop:
                t0 = time.perf_counter()
                # Take the whole window first: its true item count normalizes every micro-batch's loss.
                window = list(itertools.islice(it, cfg.accumulate))
                if not window:
                    break
                parts = [loss.split(b) for b in window]
                state.batch_in_epoch += len(window)
                if single:
                    counts, window_total = [None], None  # one micro-batch: its own mean is the window's
                else:
                    counts = [loss.count(target, kwargs, args) for args, kwargs, target in parts]
                    window_total = sum(counts)
                    if dist is not None:
                        # The window's mean is over every rank's items (not a mean of per-rank means):
                        # sum the counts over ranks. DDP/FSDP then average gradients over ranks, so
                        # each share is divided by total / world_size.
                        window_total = dist.all_sum([window_total])[0] / dist.world_size
                    if window_total == 0:
                        continue  # nothing to learn from (every target ignored, on every rank)

                if cfg.flops and result.flops_per_sample is None and not first_window_done:
                    if dist is not None and dist.strategy == "fsdp":
                        result.uncounted_ops = ["FLOPs not counted under FSDP (sharded weights)"]
                    else:
                        _count_flops(original, parts[0], loss, device, cfg, result)

                shares = []
                last = len(parts) - 1
                for i, (args, kwargs, target) in enumerate(parts):
                    samples, tokens, real = batch_sizes(args, kwargs)
                    sample_count += samples
                    token_count += tokens
                    real_token_count += real
                    if needs_move:
                        args, kwargs, target = move_to(
                            (args, kwargs, target), device, channels_last=cfg.channels_last, non_blocking=pin
                        )
                    if bn_refresher is not None:
                        bn_refresher.remember(args, kwargs)
                    # DDP: skip the gradient all-reduce on every micro-batch but the window's last.
                    sync_ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
                    with sync_ctx:
                        with precision.autocast(), sdpa_ctx():
                            out = run_model(*args, **kwargs)
                            if single:
                                share = loss.mean(out, target)
                            else:
                                share = loss.window_share(out, target, window_total, counts[i])
                        precision.backward(share)
                    shares.append(share.detach())

                # The host reads the loss once per optimizer step, after all backward work is queued.
                loss_value = float(shares[0]) if single else sum(float(x) for x in shares)
                if dist is not None:  # the global window loss, the same on every rank: all skip together
                    loss_value = dist.all_sum([loss_value])[0] / dist.world_size
                if not math.isfinite(loss_value):
                    optimizer.zero_grad(set_to_none=True)
                    state.nonfinite += 1
                    state.nonfinite_in_row += 1
                    where = (
                        f"epoch {state.epoch}, micro-batches {state.batch_in_epoch - len(window)}"
                        f"..{state.batch_in_epoch - 1}, optimizer step {state.step}"
                    )
                    monitor.print(f"[yellow]non-finite loss ({loss_value}) at {where}: step skipped")
                    log({"step": state.step, "event": "nonfinite_loss", "loss": loss_value, "where": where})
                    if state.nonfinite_in_row >= cfg.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{state.nonfinite_in_row} non-finite losses in a row (last at {where}); "
                            "lower train.lr, enable train.clip.norm, or check the data for NaN/inf"
                        )
                    continue
                state.nonfinite_in_row = 0

                lr = set_lr(optimizer, state.step, cfg.schedule, total_steps)
                precision.unscale_(optimizer)  # once, after the last micro-batch, before clipping
                if cfg.clip.norm is not None:
                    torch.nn.utils.clip_grad_norm_(original.parameters(), cfg.clip.norm, foreach=True)
                elif cfg.clip.value is not None:
                    torch.nn.utils.clip_grad_value_(original.parameters(), cfg.clip.value, foreach=True)
                stepped = precision.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
                if stepped:
                    state.step += 1
                    for hook in step_hooks:
                        hook(state.step, original)
                    if ema is not None and state.step % cfg.ema.every == 0:
                        ema.update_parameters(original)
                else:
                    state.skipped += 1  # fp16 overflow: the schedule does not advance
                result.losses.append(loss_value)
                result.lrs.append(lr)

                t_mid = time.perf_counter()
                counted = first_window_done
                if counted:
                    timed_s += t_mid - t0
                else:  # the first window carries compile/warm-up cost: keep it out of throughput
                    first_window_done = True
                    sample_count = token_count = real_token_count = 0
                monitor.step(state.step, loss_value, lr, sample_count, timed_s)
                if state.step % cfg.log_every == 0 or not stepped:
                    record = {
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": loss_value,
                        "lr": lr,
                        "skipped_steps": state.skipped,
                    }
                    if timed_s > 0:
                        # (distributed: rank 0's rate times the world; ranks run in lockstep)
                        scale = dist.world_size if dist is not None else 1
                        record["samples_per_s"] = scale * sample_count / timed_s
                        if token_count:
                            record["tokens_per_s"] = scale * token_count / timed_s
                    log(record)
                if counted:  # the bar and the metrics are part of what a step costs
                    timed_s += time.perf_counter() - t_mid

                if stepped and cfg.eval_every and state.step % cfg.eval_every == 0:
                    stop = run_eval()
                if stepped and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    save_checkpoint(epoch_end=False)
                if cfg.max_steps is not None and state.step + state.skipped >= cfg.max_steps:
                    stop = True

            epoch_finished = not stop or (
                micro_per_epoch is not None and state.batch_in_epoch >= micro_per_epoch
            )
            if epoch_finished:
                result.epochs_completed = state.epoch + 1
                if not cfg.eval_every and run_eval():
                    stop = True
                    result.stopped_early = True
                save_checkpoint(epoch_end=True)
                state.epoch += 1
            elif stop and cfg.early_stopping is not None and state.bad_evals >= cfg.early_stopping.patience:
                result.stopped_early = True
        # Stopped mid-epoch (max_steps): evaluate the final weights; with periodic checkpoints on,
        # checkpoint them too so a later --resume continues from here (model.pt is written regardless).
        if done_at["eval"] != state.step and not result.stopped_early:
            run_eval()
        if cfg.checkpoint_every and done_at["checkpoint"] != state.step:
            save_checkpoint(epoch_end=False)
    except BaseException:
        monitor.close()
        raise

    # --- results --------------------------------------------------------------------------------------
    result.steps, result.skipped_steps, result.nonfinite_losses = state.step, state.skipped, state.nonfinite
    if dist is not None:  # throughput of the whole job
        sample_count, token_count, real_token_count = (
            int(v) for v in dist.all_sum([sample_count, token_count, real_token_count])
        )
    result.train_time_s = timed_s
    if timed_s > 0:
        result.samples_per_s = sample_count / timed_s
        result.tokens_per_s = token_count / timed_s
        if token_count:
            result.padding_efficiency = real_token_count / token_count
    if result.flops_per_sample is not None and result.samples_per_s:
        result.achieved_flops_per_s = result.flops_per_sample * result.samples_per_s
        result.peak_flops_per_s = _peak(precision.dtype, device)
        if result.peak_flops_per_s:
            result.mfu = result.achieved_flops_per_s / result.peak_flops_per_s
    if ema is not None:
        if bn_refresher is not None:
            bn_refresher.refresh(ema.module, precision.autocast)
        original.load_state_dict(ema.module.state_dict())
    if cfg.activation_checkpointing is not None:
        remove_activation_checkpointing(original)
    for cb in callbacks:
        if callable(getattr(cb, "on_train_end", None)):
            cb.on_train_end(original)
    if out_dir is not None:
        # The whole, unprefixed state_dict (FSDP: gathered from the shards, a collective on all ranks).
        final_state = original.state_dict() if dist is None else ckpt_io.full_model_state_dict(original)
        if main:
            ckpt_io.atomic_save(final_state, out_dir / "model.pt")
        summary = result.summary()
        summary["event"] = "summary"
        monitor.log(summary, tensorboard=False)
    monitor.close()
    return result


# -------------------------------------------------------------------------------- internals


def _merge_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is None:
        return train_config(**overrides)
    if not overrides:
        return config
    merged = config.model_dump()
    merged.update(overrides)
    return train_config(**merged)


def _resolve_resume(resume: str | Path | None, out_dir: Path | None) -> Path | None:
    if resume is None:
        return None
    if str(resume) == "auto":
        if out_dir is None:
            raise RecipeError("resume='auto' needs train.out_dir to look for checkpoints in")
        return latest_checkpoint(out_dir)  # None: nothing to resume, start fresh
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint(path) or latest_checkpoint(path.parent)
        if found is None:
            raise CheckpointError(f"no step-*.pt checkpoint under {path}")
        return found
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _restore(
    path: Path,
    original: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    ema: nn.Module | None,
    loader: Any,
    state: _State,
    result: FitResult,
    dist: distributed.DistContext | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    ckpt = ckpt_io.load_checkpoint(path)
    ckpt_io.check_format(ckpt, path)
    if ckpt.get("sharded"):  # FSDP shards (DCP): loadable on any world size, one process included
        ckpt_io.load_sharded(original, optimizer, path.parent / ckpt["sharded"])
    else:
        if dist is not None and dist.strategy == "fsdp":
            raise CheckpointError(
                f"{path} holds a full model and optimizer (written by one process or DDP); resuming it "
                "under FSDP is not supported: resume with train.strategy='ddp' (or one process), or load "
                "only the weights (model.pt) into the model before fit"
            )
        ckpt_io.load_model_state(original, ckpt["model"], path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer state in {path} does not match this optimizer: {exc}") from None
    precision.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    s = ckpt["state"]
    state.step, state.skipped, state.nonfinite = s["step"], s["skipped"], s["nonfinite"]
    state.epoch, state.batch_in_epoch = s["epoch"], s["batch_in_epoch"]
    state.best, state.bad_evals = s["best"], s["bad_evals"]
    result.losses, result.lrs = list(ckpt["losses"]), list(ckpt["lrs"])
    result.last_checkpoint = str(path)
    rng = {"now": ckpt["rng"], "epoch_start": ckpt["rng_epoch_start"]}
    saved_world, world = int(ckpt.get("world_size", 1)), dist.world_size if dist is not None else 1
    if dist is not None and dist.rank > 0:  # this rank's own RNG streams, from its part of the checkpoint
        part = ckpt_io.rank_parts_dir(path) / f"rank-{dist.rank}.pt"
        if part.is_file():
            saved = ckpt_io.load_checkpoint(part)
            rng = {"now": saved["rng"], "epoch_start": saved["rng_epoch_start"]}
        else:  # a rank the writing job did not have: a fresh stream of its own
            _seed_everything(seed + dist.rank + 1_000_003 * state.step)
            fresh = ckpt_io.rng_state()
            rng = {"now": fresh, "epoch_start": fresh if rng["epoch_start"] is not None else None}
    if saved_world != world and state.batch_in_epoch:
        state.batch_in_epoch = _remap_position(path, ckpt, loader, state.batch_in_epoch, saved_world)
    return rng


def _remap_position(path: Path, ckpt: dict[str, Any], loader: Any, batches: int, saved_world: int) -> int:
    """A mid-epoch position written by ``saved_world`` ranks, in batches of this run's sampler."""
    import warnings

    sampler = _sampler_of(loader)
    saved_batch = ckpt.get("batch_size")
    if not isinstance(sampler, EpochBatchSampler) or not saved_batch:
        raise CheckpointError(
            f"{path} was written mid-epoch by {saved_world} rank(s); this run has a different number "
            "and its sampler cannot map the position: resume with the same number of ranks, or from an "
            "epoch-end checkpoint (train.checkpoint_every = 0)"
        )
    consumed = min(batches * int(saved_batch) * saved_world, sampler.n)
    position, rest = divmod(consumed, sampler.batch_size * sampler.num_replicas)
    if rest:
        warnings.warn(
            f"resuming {path} ({saved_world} rank(s)) on {sampler.num_replicas}: {rest} sample(s) of the "
            "epoch are seen again (the position falls inside a global batch of this run)",
            stacklevel=3,
        )
    return position


def _check_distributed(cfg: TrainConfig, dist: distributed.DistContext) -> None:
    """Combinations fit does not support under torch.distributed, refused before any work."""
    if dist.strategy != "fsdp":
        return
    if cfg.optimizer.implementation == "fused":
        raise RecipeError(
            "train.optimizer.implementation='fused' has no kernel for FSDP's sharded (DTensor) "
            "parameters: use 'auto' (foreach under FSDP) or 'foreach'"
        )
    if cfg.precision == "fp16":
        raise RecipeError(
            "train.precision='fp16' with FSDP needs a sharded gradient scaler, which fit does not "
            "provide: use precision='bf16' (no scaler), or train.strategy='ddp'"
        )
    if cfg.ema is not None and cfg.ema.enabled:
        raise RecipeError(
            "train.ema with FSDP is not supported (the average would need the full weights): "
            "use train.strategy='ddp' or turn EMA off"
        )


def _count_flops(
    original: nn.Module,
    part: tuple,
    loss: LossComputer,
    device: torch.device,
    cfg: TrainConfig,
    result: FitResult,
) -> None:
    """FLOPs of one forward+backward on the first micro-batch, on the eager model without recompute."""
    from torchkiln.measure import training_step_flops

    args, kwargs, target = move_to(part, device, channels_last=cfg.channels_last)
    count = loss.count(target, kwargs, args)
    had_ckpt = remove_activation_checkpointing(original) > 0
    try:

        def loss_of(output: Any) -> torch.Tensor:
            return loss.window_share(output, target, max(count, 1), count)

        inputs = kwargs if kwargs else args
        flops = training_step_flops(original, inputs, loss_fn=loss_of)
    except Exception as exc:  # noqa: BLE001 - FLOP counting is informational; never fail training on it
        result.uncounted_ops = [f"FLOP counting failed: {type(exc).__name__}: {exc}"]
        return
    finally:
        if had_ckpt and cfg.activation_checkpointing is not None:
            ac = cfg.activation_checkpointing
            apply_activation_checkpointing(original, modules=ac.modules, every=ac.every)
    samples, _, _ = batch_sizes(args, kwargs)
    result.flops_per_sample = flops.total / max(samples, 1)
    result.flops_per_step = flops.total * cfg.accumulate
    result.uncounted_ops = list(flops.uncounted_ops)


def _peak(dtype: torch.dtype, device: torch.device) -> float | None:
    try:
        from torchkiln.measure import peak_flops

        return peak_flops(dtype, device)
    except Exception:  # noqa: BLE001 - MFU is optional; a missing peak leaves it None
        return None
