"""Gradient all-reduces per optimizer step under accumulation, with and without DDP ``no_sync``.

Two CPU processes (gloo, torchrun), gpt-tiny (n_embd=128, 4 layers, 0.83M parameters) on the pycode
corpus, per-rank batch 4 x 64 tokens, ``accumulate=4``. ``fit`` skips the gradient all-reduce on every
micro-batch but the window's last (``no_sync``); the baseline is the same ``fit`` on a DDP whose
``no_sync`` does nothing. Counted, not timed: a DDP comm hook counts the bucket all-reduces, and a
wrapper around ``torch.distributed.all_reduce`` counts every all-reduce fit issues, which also includes
its two 8-byte reductions per step (the window's item count before backward, the loss after).

Headline ``allreduce_ratio`` = gradient all-reduces per step with no_sync / without, counted after
step 1 (target 0.25 = 1 / accumulate): DDP's first iteration uses provisional buckets (smaller first
bucket) and rebuilds them after, so step 1 alone is reported apart (``allreduce_ratio_step1``).
``grad_bytes_ratio``: gradient bytes all-reduced over every step; ``collectives_ratio`` counts every
all-reduce including fit's two scalar ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, figure, log, record, run_benchmark

BENCH = "dist_allreduce_saving"
THREADS = (1,)
TARGET = "<= 0.25"
ACCUMULATE = 4


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant")


def _worker(out: Path, steps: int) -> None:
    """One rank of the 2-process job; rank 0 writes the counts to ``out``."""
    import torch
    import torch.distributed as dist
    from torch import nn

    import torchkiln as tk
    from torchkiln.train import distributed

    torch.set_num_threads(1)
    distributed.setup("cpu", timeout_s=120)
    calls = {"all_reduce": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        calls["all_reduce"] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce  # fit's own reductions and the comm hook's bucket all-reduces

    class AlwaysSync(nn.parallel.DistributedDataParallel):
        def no_sync(self):  # type: ignore[override]
            return contextlib.nullcontext()

    data = tk.create_dataset("pycode", "train", seq_len=64)
    found = {}
    for name, cls in (("no_sync", nn.parallel.DistributedDataParallel), ("always_sync", AlwaysSync)):
        torch.manual_seed(0)
        model = tk.create_model("gpt-tiny", seq_len=64)
        ddp = cls(model)
        hook = distributed.count_allreduces(ddp)
        calls["all_reduce"] = 0
        after_first: dict[str, int] = {}

        class AfterFirstStep:
            """Counts at the end of step 1: DDP rebuilds its buckets after the first iteration."""

            def __init__(self, hook: dict[str, int], into: dict[str, int]) -> None:
                self.hook, self.into = hook, into

            def __call__(self, record: dict) -> None:
                pass

            def on_step(self, step: int, _model: nn.Module) -> None:
                if step == 1:
                    self.into.update(self.hook, all_reduce=calls["all_reduce"])

        r = tk.fit(
            ddp,
            data,
            batch_size=4,
            accumulate=ACCUMULATE,
            max_steps=steps,
            optimizer="adamw",
            progress="off",
            flops=False,
            dist_timeout_s=120,
            callbacks=[AfterFirstStep(hook, after_first)],
        )
        found[name] = {
            "steps": r.steps,
            "grad_allreduces": hook["calls"],
            "grad_bytes": hook["bytes"],
            "all_reduces": calls["all_reduce"],
            "first_step": after_first,
            "params": sum(p.numel() for p in model.parameters()),
            "loss": r.losses[-1],
        }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(found))
    distributed.shutdown()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps or (4 if args.quick else 10)
    out = ROOT / ".cache" / f"{BENCH}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    log(f"[{BENCH}] 2 processes (gloo), gpt-tiny, accumulate {ACCUMULATE}, {steps} steps per variant ...")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["--module", f"benchmarks.{BENCH}", "--worker", str(out), "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{BENCH}: the 2-process job failed:\n{proc.stderr[-4000:]}")
    found = json.loads(out.read_text())
    a, b = found["no_sync"], found["always_sync"]

    def steady(v: dict[str, Any], key: str, first_key: str) -> float:  # per step, steps 2..N
        return (v[key] - v["first_step"][first_key]) / (v["steps"] - 1)

    ratio = steady(a, "grad_allreduces", "calls") / steady(b, "grad_allreduces", "calls")
    first = a["first_step"]["calls"] / b["first_step"]["calls"]
    figures = [
        figure(
            "allreduce_ratio",
            ratio,
            TARGET,
            rounds=a["steps"] - 1,
            note=f"gradient bucket all-reduces per optimizer step after step 1: "
            f"{steady(a, 'grad_allreduces', 'calls'):g} with no_sync, "
            f"{steady(b, 'grad_allreduces', 'calls'):g} without (accumulate {ACCUMULATE}); step 1 "
            f"(DDP's first-iteration buckets) {a['first_step']['calls']} vs {b['first_step']['calls']}",
        ),
        figure(
            "grad_bytes_ratio",
            a["grad_bytes"] / b["grad_bytes"],
            note=f"gradient bytes all-reduced over all {a['steps']} steps: {a['grad_bytes'] / 1e6:.1f} MB vs "
            f"{b['grad_bytes'] / 1e6:.1f} MB (fp32, {a['params']:,} parameters)",
        ),
        figure(
            "allreduce_ratio_step1",
            first,
            note="the same count on step 1 alone (DDP builds its final buckets after the first iteration)",
        ),
        figure(
            "collectives_ratio",
            steady(a, "all_reduces", "all_reduce") / steady(b, "all_reduces", "all_reduce"),
            note=f"every all_reduce per step after step 1, with fit's two 8-byte ones per step (and its one "
            f"at the end of fit, spread over the steps): "
            f"{steady(a, 'all_reduces', 'all_reduce'):g} vs {steady(b, 'all_reduces', 'all_reduce'):g}",
        ),
    ]
    return record(
        BENCH,
        figures,
        note=f"counted over {a['steps']} optimizer steps per variant on 2 gloo processes; "
        f"the gradient all-reduce runs once per window instead of once per micro-batch",
        quick=bool(args.quick),
        processes=2,
        accumulate=ACCUMULATE,
        counts=found,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--threads", type=int, default=1)
        _add_args(parser)
        a = parser.parse_args(argv)
        _worker(a.worker, a.steps or 3)
        return {}
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
