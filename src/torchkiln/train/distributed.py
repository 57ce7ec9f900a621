"""torch.distributed for :func:`~torchkiln.train.fit`: the process group from the torchrun environment,
DDP / FSDP2 wrapping, batch samplers that shard across ranks with equal batch counts, reductions of sums
and counts, and the elastic launcher behind ``kiln train --nproc-per-node N``.

Nothing here runs in a single process: ``fit`` calls :func:`setup`, which returns ``None`` unless the
process was started by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) or a process
group already exists.

Conventions:

* ``batch_size`` is per rank (the PyTorch convention): the global batch of one optimizer step is
  ``batch_size * world_size * accumulate``.
* ``strategy="auto"``: no wrapping for one process, DDP below ``fsdp.auto_above_params`` parameters,
  FSDP2 (``fully_shard``) at or above it (default 100M parameters: from there the replicated fp32
  weights, gradients and Adam states of DDP take 1.6 GB+ per rank).
* Backend ``auto``: nccl on CUDA, gloo on CPU. Every collective has a timeout (``dist_timeout_s``), so
  a rank that dies or hangs ends the job with an error instead of a hang.

>>> even_split(list(range(5)), 2)
[[0, 1, 2], [3, 4]]
>>> equalize_batches([[0, 1, 2], [3]], 4, drop_last=False)
[[0], [1], [2], [3]]
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchkiln.errors import KilnError, RecipeError

STRATEGIES = ("auto", "none", "ddp", "fsdp")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DistributedError(KilnError, RuntimeError):
    """A distributed job failed (a rank died, hung past the timeout, or the set-up is unsupported)."""


# ---------------------------------------------------------------------------------------------- environment


def launched_env() -> dict[str, int] | None:
    """``rank``, ``world_size``, ``local_rank``, ``restart_count`` when torchrun started this process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return {
            "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        }
    except ValueError as exc:
        raise DistributedError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None


def env_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` from the environment, ``(0, 1)`` outside torchrun (no process group needed)."""
    env = launched_env()
    return (env["rank"], env["world_size"]) if env else (0, 1)


def is_main_process() -> bool:
    """True on global rank 0, and in any process not started by torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank_world()[0] == 0


@dataclass
class DistContext:
    """The process group fit trains in, and the strategy chosen for the model."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    restart_count: int = 0
    strategy: str = "ddp"
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Sum ``values`` over ranks in one all_reduce (float64: exact for counts up to 2**53)."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RecipeError(f"train.dist_backend='nccl' needs CUDA devices, but training runs on {device}")
    return backend


def setup(
    device_name: str = "auto", *, backend: str = "auto", timeout_s: float = 300.0, strategy: str = "auto"
) -> DistContext | None:
    """Join (or create) the default process group when launched by torchrun; ``None`` otherwise.

    The device is ``cuda:LOCAL_RANK`` on CUDA (``device='auto'|'cuda'``), else the CPU.
    """
    import torch.distributed as dist

    env = launched_env()
    initialized = dist.is_available() and dist.is_initialized()
    if env is None and not initialized:
        if strategy in ("ddp", "fsdp"):
            raise RecipeError(
                f"train.strategy={strategy!r} needs several processes: launch with "
                "`kiln train RECIPE --nproc-per-node N` or `torchrun --nproc-per-node N ...`"
            )
        return None
    if not initialized and env is not None and env["world_size"] == 1 and strategy in ("auto", "none"):
        return None  # torchrun with one process: nothing to distribute
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this PyTorch build")
    local_rank = env["local_rank"] if env else 0
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_name.startswith("cuda"):
        device = torch.device(device_name)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name if device_name != "auto" else "cpu")
    created = False
    if not initialized:
        chosen = resolve_backend(backend, device)
        # The timeout bounds every collective: a dead or hung peer raises here instead of hanging.
        dist.init_process_group(
            backend=chosen,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if chosen == "nccl" else None,
        )
        created = True
    ctx = DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=str(dist.get_backend()),
        device=device,
        restart_count=env["restart_count"] if env else 0,
        created_group=created,
    )
    if strategy == "none" and ctx.world_size > 1:
        raise RecipeError(
            f"train.strategy='none' under {ctx.world_size} processes would train {ctx.world_size} "
            "unrelated copies; use 'auto', 'ddp' or 'fsdp', or launch one process"
        )
    return ctx


def shutdown() -> None:
    """Barrier, then destroy the default process group (if any).

    The barrier matters: a rank that destroys its group while a peer is still in a collective (rank 0
    writing the final checkpoint, say) can abort that peer with SIGABRT under gloo.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- strategy


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_strategy(strategy: str, model: nn.Module, world_size: int, fsdp_above_params: int) -> str:
    """``none`` | ``ddp`` | ``fsdp`` for ``strategy`` (``auto`` decides by world size and parameter count).

    >>> resolve_strategy("auto", nn.Linear(4, 4), 2, 100_000_000)
    'ddp'
    >>> resolve_strategy("auto", nn.Linear(4, 4), 2, 10)
    'fsdp'
    """
    if strategy not in STRATEGIES:
        raise RecipeError(f"train.strategy={strategy!r}; accepted: {', '.join(STRATEGIES)}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"  # wrapped by the caller
    if world_size <= 1 and strategy == "auto":
        return "none"
    if strategy != "auto":
        return strategy
    return "fsdp" if parameter_count(model) >= fsdp_above_params else "ddp"


def wrap_model(model: nn.Module, ctx: DistContext, fsdp_cfg: Any = None) -> nn.Module:
    """DDP around ``model``, or FSDP2 ``fully_shard`` on its repeated blocks and then the root (in place).

    For FSDP every rank starts from rank 0's weights (broadcast first), as DDP does, so a model built
    without a shared seed is still sharded consistently.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    if ctx.strategy == "ddp":
        device_ids = [ctx.device.index or 0] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if ctx.strategy != "fsdp":
        raise ValueError(f"cannot wrap for strategy {ctx.strategy!r}")
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from torchkiln.train.activation_checkpointing import find_blocks

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    param_dtype = getattr(fsdp_cfg, "param_dtype", None)
    reduce_dtype = getattr(fsdp_cfg, "reduce_dtype", None)
    mp = MixedPrecisionPolicy(
        param_dtype=_DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=_DTYPES[reduce_dtype] if reduce_dtype else None,
    )
    offload: OffloadPolicy = OffloadPolicy()
    if getattr(fsdp_cfg, "cpu_offload", False):
        if ctx.device.type != "cuda":
            raise RecipeError(
                "train.fsdp.cpu_offload=true moves sharded parameters, gradients and optimizer states "
                f"from the GPU to the CPU, but training already runs on {ctx.device}; set it to false"
            )
        offload = CPUOffloadPolicy()
    reshard = getattr(fsdp_cfg, "reshard_after_forward", True)
    for _, block in find_blocks(model):  # one all-gather / reduce-scatter group per block
        fully_shard(block, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    return model


def no_sync_context(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager] | None:
    """A context factory that skips the gradient reduction for one micro-batch (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync(False)``), or None when the model has neither."""
    no_sync = getattr(model, "no_sync", None)
    if no_sync is not None:
        return no_sync
    if callable(getattr(model, "set_requires_gradient_sync", None)):

        @contextlib.contextmanager
        def fsdp_no_sync() -> Iterator[None]:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync
    return None


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def count_allreduces(model: nn.parallel.DistributedDataParallel) -> dict[str, int]:
    """Register a DDP comm hook that counts gradient all-reduces (one per bucket per synced backward)
    and then does DDP's default all-reduce; return the live counter ``{"calls": n, "bytes": b}``.

    A DDP model takes one comm hook: call this before training, at most once.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter = {"calls": 0, "bytes": 0}

    # (No annotations: DDP checks them against dist.GradBucket / Future[Tensor], and this module's
    # postponed annotations would be strings.)
    def counting_hook(state, bucket):  # noqa: ANN001, ANN202
        counter["calls"] += 1
        buffer = bucket.buffer()
        counter["bytes"] += buffer.numel() * buffer.element_size()
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    return counter


# ---------------------------------------------------------------------------------------------- sampling


def even_split(items: list[int], parts: int) -> list[list[int]]:
    """``items`` cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = q + (1 if p < r else 0)
        out.append(items[start : start + size])
        start += size
    return out


def equalize_batches(batches: list[list[int]], world: int, *, drop_last: bool) -> list[list[int]]:
    """Make the batch count a multiple of ``world`` (unequal counts per rank hang collectives).

    ``drop_last``: drop the last ``len % world`` batches. Otherwise split the largest batches in two
    (every sample still once) and, only when every batch is a single sample, repeat batches from the
    start.
    """
    if world <= 1 or len(batches) % world == 0:
        return batches
    if drop_last:
        kept = batches[: len(batches) - len(batches) % world]
        if not kept:
            raise ValueError(f"fewer batches ({len(batches)}) than ranks ({world}) with drop_last=True")
        return kept
    batches = [list(b) for b in batches]
    need = (-len(batches)) % world
    while need:
        j = max(range(len(batches)), key=lambda m: (len(batches[m]), -m))
        b = batches[j]
        if len(b) < 2:
            break
        batches[j : j + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        need -= 1
    if need:
        batches = batches + [list(b) for b in (batches * need)[:need]]
    return batches


class ShardedBatchSampler:
    """Shards any deterministic batch sampler across ranks: every rank builds the same list of batches
    (the inner sampler is iterated under an RNG seeded by ``(seed, epoch)``, so samplers that draw from
    the global RNG agree across ranks too) and takes batches ``rank::world``.

    ``equal=True`` (training) makes the count a multiple of ``world`` first (:func:`equalize_batches`);
    ``equal=False`` (evaluation) keeps every batch once, so counts may differ by one.
    """

    def __init__(
        self,
        inner: Any,
        rank: int,
        world: int,
        *,
        seed: int = 0,
        equal: bool = True,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got {rank=}, {world=}")
        self.inner, self.rank, self.world, self.seed = inner, rank, world, seed
        self.equal, self.drop_last = equal, drop_last
        self.epoch = 0
        self._skip = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def skip(self, batches: int) -> None:
        self._skip = int(batches)

    def _mine(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.epoch)
            batches = [list(b) for b in self.inner]
        if self.equal:
            batches = equalize_batches(batches, self.world, drop_last=self.drop_last)
        mine = batches[self.rank :: self.world]
        self._cache = (self.epoch, mine)
        return mine

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator[list[int]]:
        start, self._skip = self._skip, 0
        yield from self._mine()[start:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])


def shard_loader(loader: Any, ctx: DistContext, *, seed: int, equal: bool) -> Any:
    """``loader`` (a DataLoader fit did not build) sharded across ranks; already-sharded samplers
    (``num_replicas == world``) pass through."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader):
        raise DistributedError(
            f"fit cannot shard {type(loader).__name__} across {ctx.world_size} ranks with equal batch "
            "counts: pass a Dataset (fit shards it) or a torch DataLoader with a batch sampler"
        )
    inner = loader.batch_sampler
    if inner is None:
        raise DistributedError(
            "fit cannot shard a DataLoader without a batch sampler (batch_size=None or an "
            "IterableDataset) across ranks: pass a map-style Dataset, or shard the stream per rank "
            "yourself with a sampler that has num_replicas == WORLD_SIZE"
        )
    replicas = getattr(inner, "num_replicas", None)
    if replicas == ctx.world_size:
        return loader
    if replicas not in (None, 1):
        raise DistributedError(
            f"the DataLoader's batch sampler is sharded for num_replicas={replicas}, but "
            f"WORLD_SIZE={ctx.world_size}"
        )
    sampler = ShardedBatchSampler(
        inner, ctx.rank, ctx.world_size, seed=seed, equal=equal, drop_last=getattr(inner, "drop_last", False)
    )
    kwargs: dict[str, Any] = {
        "batch_sampler": sampler,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    return DataLoader(loader.dataset, **kwargs)


# ---------------------------------------------------------------------------------------------- launcher


def launch(
    worker_args: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    max_restarts: int = 0,
    monitor_interval_s: float = 0.5,
) -> None:
    """Run ``python -m torchkiln.cli.main *worker_args`` on ``nproc_per_node`` processes per node through
    ``torch.distributed.run`` (elastic: a failed worker group is restarted up to ``max_restarts`` times,
    and a restarted ``kiln train`` resumes from the newest checkpoint).

    One node without ``master_port``: a standalone rendezvous on a free local port. Several nodes:
    static rendezvous at ``master_addr:master_port`` (every node runs the same command with its
    ``node_rank``). Raises :class:`DistributedError` naming the first failed rank.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes or max_restarts < 0:
        raise RecipeError(
            f"bad launch options: nproc_per_node={nproc_per_node} (>= 1), nnodes={nnodes} (>= 1), "
            f"node_rank={node_rank} (0..nnodes-1), max_restarts={max_restarts} (>= 0)"
        )
    argv = [
        f"--nproc-per-node={nproc_per_node}",
        f"--nnodes={nnodes}",
        f"--max-restarts={max_restarts}",
        f"--monitor-interval={monitor_interval_s}",
    ]
    if nnodes == 1 and master_port is None and master_addr is None:
        argv.append("--standalone")
    else:
        if nnodes > 1 and (master_addr is None or master_port is None):
            raise RecipeError(f"--nnodes {nnodes} needs --master-addr and --master-port (rank 0's node)")
        argv += [
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr or '127.0.0.1'}",
            f"--master-port={master_port or 29500}",
        ]
    argv += ["--module", "torchkiln.cli.main", *worker_args]
    if max_restarts:
        # Workers sharing the rendezvous TCPStore can read a previous attempt's keys after a restart
        # and connect to a dead peer (pytorch/pytorch#135712; seen here as gloo "Connection refused"):
        # give every attempt its own store.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun.main(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (
            f"was killed by signal {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        detail = ""
        if isinstance(failure.message, str) and failure.message and "Signal" not in failure.message:
            detail = f": {failure.message.strip().splitlines()[-1][:300]}"
        elif isinstance(failure.message, dict):
            msg = failure.message.get("message", {})
            text = msg.get("message") if isinstance(msg, dict) else str(msg)
            if text:
                detail = f": {str(text).strip().splitlines()[-1][:300]}"
        restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
        raise DistributedError(
            f"distributed training failed{restarts}: rank {rank} (local rank {failure.local_rank}) {how}"
            f"{detail}; the other ranks were stopped. Rerun with --resume auto to continue from the "
            "last checkpoint, or pass --max-restarts K to restart automatically"
        ) from None
