"""Data-parallel scaling on this machine: 1 process against 2 (DDP, gloo), samples/s per process.

gpt-tiny (n_embd=128, 4 layers) on the pycode corpus, per-process batch 8 x 64 tokens, AdamW, one
thread per process (``THREADS=(1,)``), launched through torchrun each time. ``fit`` reports the job's
throughput (the first window, with its warm-up, is left out); per process = that / world size. The
two launches alternate (1, 2, 1, 2, ...) and ``efficiency`` is the median over pairs of
(samples/s per process with 2) / (samples/s with 1). 1.0 is perfect scaling; below it is what the
all-reduce of 3.3 MB of gradients per step and sharing the machine's cores cost.

Read it beside ``logical_cores``: on a 2-core machine 2 one-thread processes fill every core (no room
for the OS, the data loading, or a neighbour), so this is a lower bound on what DDP gives on more
cores, not a figure for a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, figure, log, record, run_benchmark, spread_of

BENCH = "dist_scaling"
THREADS = (1,)
TARGET = ">= 0.8"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per launch")
    parser.add_argument("--batch-size", type=int, default=8, help="per process")


def _worker(out: Path, steps: int, batch_size: int) -> None:
    import torch

    import torchkiln as tk
    from torchkiln.train import distributed

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", seq_len=64)
    data = tk.create_dataset("pycode", "train", seq_len=64)
    r = tk.fit(
        model,
        data,
        batch_size=batch_size,
        max_steps=steps,
        optimizer="adamw",
        progress="off",
        flops=False,
        dist_timeout_s=120,
    )
    if distributed.is_main_process():
        out.write_text(json.dumps({"samples_per_s": r.samples_per_s, "world_size": r.world_size}))
    distributed.shutdown()


def _launch(nproc: int, steps: int, batch_size: int) -> float:
    """Samples/s per process of one ``nproc``-process run."""
    out = ROOT / ".cache" / f"{BENCH}-{nproc}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["--module", f"benchmarks.{BENCH}", "--worker", str(out)]
    cmd += ["--steps", str(steps), "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{BENCH}: the {nproc}-process run failed:\n{proc.stderr[-4000:]}")
    found = json.loads(out.read_text())
    if found["world_size"] != nproc:
        raise RuntimeError(f"{BENCH}: expected {nproc} processes, fit reports {found['world_size']}")
    return found["samples_per_s"] / nproc


def measure(args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps or (12 if args.quick else 40)
    pairs = 2 if args.quick else 5
    one, two, ratios = [], [], []
    for i in range(pairs):
        log(f"[{BENCH}] pair {i + 1}/{pairs}: 1 process, then 2 ({steps} steps, batch {args.batch_size}) ...")
        a = _launch(1, steps, args.batch_size)
        b = _launch(2, steps, args.batch_size)
        one.append(a)
        two.append(b)
        ratios.append(b / a)
    spread = spread_of(ratios)
    cores = os.cpu_count()
    eff = spread["median"]
    figures = [
        figure(
            "efficiency",
            eff,
            TARGET,
            spread=spread,
            rounds=pairs,
            note=f"samples/s per process, 2 processes / 1 (median of {pairs} interleaved pairs); "
            f"{cores} logical cores, 1 thread per process",
        ),
        figure(
            "samples_per_s_1proc",
            spread_of(one)["median"],
            spread=spread_of(one),
            rounds=pairs,
            unit="samples/s",
            note="one process, one thread",
        ),
        figure(
            "samples_per_s_per_proc_2proc",
            spread_of(two)["median"],
            spread=spread_of(two),
            rounds=pairs,
            unit="samples/s",
            note="each of 2 DDP processes, one thread each",
        ),
        figure(
            "speedup_2proc",
            2 * eff,
            note="job throughput with 2 processes over 1 (= 2 x efficiency)",
        ),
    ]
    note = (
        f"2 DDP processes on {cores} logical cores run at {eff:.2f}x the per-process rate of 1 "
        f"({2 * eff:.2f}x the job throughput)"
    )
    if eff < 0.8:
        note += (
            "; short of 0.8: with 2 one-thread processes on 2 cores there is no idle core for the "
            "gloo all-reduce, the data loader or a neighbour, so every stall lands on a rank and the "
            "other waits for it at the next all-reduce"
        )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        steps=steps,
        batch_size=args.batch_size,
        processes=(1, 2),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--threads", type=int, default=1)
        _add_args(parser)
        a = parser.parse_args(argv)
        _worker(a.worker, a.steps or 12, a.batch_size)
        return {}
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
