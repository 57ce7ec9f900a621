"""Worker for the distributed tests: ``torchrun --nproc-per-node 2 tests/train/dist_worker.py SCENARIO OUT``.

Each scenario trains tiny models with ``fit`` on every rank and rank 0 writes what the test compares
(``OUT/result.pt``). Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.train.helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from tests.train.helpers import make_case  # noqa: E402
from torchkiln.train import distributed, fit  # noqa: E402

COMMON = {"optimizer": "sgd", "lr": 0.5, "progress": "off", "flops": False, "dist_timeout_s": 60}


def parity(out: Path) -> dict:
    """DDP runs at per-rank batch 4 (global 8); the test repeats them in one process at batch 8."""
    found = {}
    for arch, n in (("mlp", 26), ("gpt", 20)):
        model, data = make_case(arch, n=n)
        r = fit(model, data, batch_size=4, epochs=2, accumulate=2, **COMMON)
        found[arch] = {
            "losses": r.losses,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        }
    return found


class _AlwaysSync(nn.parallel.DistributedDataParallel):
    """DDP whose no_sync does nothing: what accumulation costs without skipping the all-reduce."""

    def no_sync(self):  # type: ignore[override]
        return contextlib.nullcontext()


def allreduce_counts(out: Path) -> dict:
    distributed.setup("cpu", timeout_s=60)  # a caller who wraps DDP itself creates the group first
    counts = {}
    for name, cls in (("no_sync", nn.parallel.DistributedDataParallel), ("always", _AlwaysSync)):
        model, data = make_case("mlp", n=64)
        ddp = cls(model)
        counter = distributed.count_allreduces(ddp)
        r = fit(ddp, data, batch_size=4, accumulate=4, epochs=2, **COMMON)
        counts[name] = {"calls": counter["calls"], "steps": r.steps}
    return counts


def checkpoints(out: Path) -> dict:
    """2-rank checkpoint + resume on 2 ranks (exact), and a checkpoint for the 1-rank resume test."""
    cfg = dict(COMMON, checkpoint_every=2)
    model, data = make_case("mlp", n=32)
    fresh = fit(model, data, batch_size=4, epochs=1, max_steps=4, out_dir=str(out / "fresh"), **cfg)
    model, data = make_case("mlp", n=32)
    fit(model, data, batch_size=4, epochs=1, max_steps=2, out_dir=str(out / "resumed"), **cfg)
    model, data = make_case("mlp", n=32)
    resumed = fit(
        model, data, batch_size=4, epochs=1, max_steps=4, resume="auto", out_dir=str(out / "resumed"), **cfg
    )
    model, data = make_case("mlp", n=32)
    fit(model, data, batch_size=4, epochs=1, max_steps=2, out_dir=str(out / "two"), **cfg)
    return {"fresh": fresh.losses, "resumed": resumed.losses, "fresh_state": fresh.model.state_dict()}


def fsdp(out: Path) -> dict:
    model, data = make_case("gpt", n=32)
    r = fit(
        model,
        data,
        batch_size=4,
        epochs=1,
        strategy="fsdp",
        checkpoint_every=2,
        out_dir=str(out / "fsdp"),
        **COMMON,
    )
    found = {"losses": r.losses, "strategy": r.strategy, "val": None}
    model, data = make_case("gpt", n=32)
    mp = fit(model, data, batch_size=4, max_steps=2, strategy="fsdp", fsdp={"param_dtype": "bf16"}, **COMMON)
    found["bf16_losses"] = mp.losses
    return found


SCENARIOS = {"parity": parity, "allreduce_counts": allreduce_counts, "checkpoints": checkpoints, "fsdp": fsdp}

if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, out = sys.argv[1], Path(sys.argv[2])
    result = SCENARIOS[scenario](out)
    if dist.is_initialized() and dist.get_rank() == 0:
        torch.save(result, out / "result.pt")
    distributed.shutdown()
