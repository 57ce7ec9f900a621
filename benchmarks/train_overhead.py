"""fit() against a hand-written loop: what torchkiln's training loop costs per step.

Model: the zoo ``mlp`` (64 -> 512 -> 512 -> 10, LayerNorm + ReLU) at batch 64, about 3 ms per step on one
core here, so per-step overhead shows. Data: a synthetic classification set large enough that no call
reaches an epoch end (with ``out_dir`` set, fit writes a checkpoint at every epoch end; that cost is
measured apart as ``epoch_end_ms``).

* hand (baseline): ``DataLoader(ds, batch_size=64, shuffle=True)``, forward, ``F.cross_entropy``,
  backward, ``AdamW(lr=1e-3, weight_decay=0, fused=True).step()``, ``zero_grad``, ``float(loss)``.
* fit: ``tk.fit(model, ds, batch_size=64, max_steps=N, progress="on", out_dir=<tmp>, log_every=10)``:
  the default optimizer (fused AdamW, weight decay 0), the progress bar rendered as on a terminal (into
  /dev/null), metrics as JSONL and TensorBoard events (tensorboard is installed here) every 10 steps.

Two measurements, both alternating hand and fit in one process:

``ratio``
    Whole calls of N steps (optimizer and loader built inside the call, as fit does), A B / B A pairs
    via ``interleaved_ratio``; the median of per-pair t_hand / t_fit, fit's start-up and wrap-up included.
``ratio_steady``
    Steady state: one long ``fit`` run whose callback (called with each 10-step metrics record) runs
    10 hand-loop steps on a second copy of the model; fit's 10 steps (with its logging) and the hand
    loop's 10 steps alternate every ~30 ms, which cancels most of the machine's drift. Median of
    per-chunk t_hand / t_fit. The progress bar's refresh thread runs during both halves, so about half
    of its (small) cost is charged to the hand loop here.

``startup_ms`` is fit(max_steps=1) minus hand(1). ``*_cpu_time`` figures are the same pairs timed with
process CPU time (all threads), which a busy neighbour disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import figure, log, ratio_spread, record, run_benchmark, spread_of, throwaway_terminal

BENCH = "train_overhead"
THREADS = (1, 2)
TARGET = ">= 0.98"
LOG_EVERY = 10


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per whole call (default 600; 100 with --quick)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="10-step chunk pairs in the steady-state run (default 300; 30 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import torchkiln as tk
    from torchkiln.measure import interleaved_ratio

    steps = args.steps or (100 if args.quick else 600)
    chunks = args.chunks or (30 if args.quick else 300)
    chunk_warmup = 5
    bs = args.batch_size
    hidden = (512, 512)
    fit_steps_steady = LOG_EVERY * (chunks + chunk_warmup + 1)
    n_items = bs * (max(steps, fit_steps_steady) + 8)
    ds = tk.create_dataset("synthetic", "train", task="classification", n=n_items, features=64, num_classes=10)
    torch.manual_seed(0)
    hand_model = tk.create_model("mlp", in_features=64, hidden=hidden, num_classes=10)
    fit_model = copy.deepcopy(hand_model)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-overhead-"))

    def hand_step(optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(hand_model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def hand(n: int = steps) -> None:
        optimizer = torch.optim.AdamW(hand_model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        hand_model.train()
        for i, (x, y) in enumerate(DataLoader(ds, batch_size=bs, shuffle=True)):
            hand_step(optimizer, x, y)
            if i + 1 >= n:
                break

    def fit(n: int = steps, out_dir: Path = tmp / "fit", epochs: int = 1, data: Any = ds,
            callbacks: tuple = ()) -> Any:
        with throwaway_terminal():
            return tk.fit(fit_model, data, batch_size=bs, max_steps=n, epochs=epochs, progress="on",
                          out_dir=str(out_dir), log_every=LOG_EVERY, flops=False, callbacks=callbacks)

    # Process CPU time of the same whole calls, recorded beside interleaved_ratio's wall clock.
    warmup = 1
    cpu_a: list[float] = []
    cpu_b: list[float] = []

    def cpu_timed(fn: Any, sink: list[float]) -> Any:
        def run() -> None:
            c0 = time.process_time()
            fn()
            sink.append(time.process_time() - c0)
        return run

    try:
        log(f"[{BENCH}] mlp {hidden} batch {bs}, threads {torch.get_num_threads()}: "
            f"whole calls of {steps} steps ...")
        stats = interleaved_ratio(cpu_timed(hand, cpu_a), cpu_timed(fit, cpu_b), warmup=warmup,
                                  min_pairs=5 if args.quick else 8, max_pairs=8 if args.quick else 20,
                                  target_iqr=0.02, max_time_s=12.0 if args.quick else 60.0)
        cpu_ratios = [a / b for a, b in zip(cpu_a[warmup:], cpu_b[warmup:], strict=True) if b > 0]
        diffs_us = [(tb - ta) / steps * 1e6 for ta, tb in zip(stats.times_a, stats.times_b, strict=True)]

        log(f"[{BENCH}] steady state: {chunks} pairs of {LOG_EVERY}-step chunks inside one fit run ...")
        marks: list[tuple[float, float, float, float]] = []
        hand_opt = torch.optim.AdamW(hand_model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        hand_it = iter(DataLoader(ds, batch_size=bs, shuffle=True))

        def hand_chunk(rec: dict[str, Any]) -> None:
            nonlocal hand_it
            if "loss" not in rec or "event" in rec:
                return
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(LOG_EVERY):
                batch = next(hand_it, None)
                if batch is None:
                    hand_it = iter(DataLoader(ds, batch_size=bs, shuffle=True))
                    batch = next(hand_it)
                hand_step(hand_opt, *batch)
            marks.append((w0, time.perf_counter(), c0, time.process_time()))

        fit(fit_steps_steady, tmp / "steady", callbacks=(hand_chunk,))
        steady, steady_cpu, steady_fit_ms, steady_hand_ms = [], [], [], []
        for (_, e0, _, ce0), (s1, e1, cs1, ce1) in list(zip(marks, marks[1:], strict=False))[chunk_warmup:]:
            t_fit, t_hand = s1 - e0, e1 - s1  # fit's 10 steps (and its log write), then the hand loop's
            steady.append(t_hand / t_fit)
            steady_cpu.append((ce1 - cs1) / (cs1 - ce0))
            steady_fit_ms.append(t_fit / LOG_EVERY * 1e3)
            steady_hand_ms.append(t_hand / LOG_EVERY * 1e3)
        steady_us = [(f - h) * 1e3 for f, h in zip(steady_fit_ms, steady_hand_ms, strict=True)]

        log(f"[{BENCH}] start-up and epoch-end costs ...")
        startup = interleaved_ratio(lambda: hand(1), lambda: fit(1), warmup=2, min_pairs=5,
                                    max_pairs=15, target_iqr=0.05, max_time_s=5.0)
        startup_ms = [(tb - ta) * 1e3 for ta, tb in zip(startup.times_a, startup.times_b, strict=True)]

        small = torch.utils.data.Subset(ds, range(bs * LOG_EVERY))
        epoch_ms: list[float] = []
        for _ in range(3 if args.quick else 5):
            t0 = time.perf_counter()
            fit(LOG_EVERY, tmp / "epoch", data=small)  # the whole (10-batch) epoch: checkpoint at its end
            t_epoch = time.perf_counter() - t0
            t0 = time.perf_counter()
            fit(LOG_EVERY, tmp / "noepoch")  # the same 10 steps, stopping by max_steps before an epoch end
            epoch_ms.append((t_epoch - (time.perf_counter() - t0)) * 1e3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    hand_ms = stats.median_a / steps * 1e3
    overhead = spread_of(diffs_us)
    steady_s = spread_of(steady)
    start = spread_of(startup_ms)
    figures = [
        figure("ratio", stats.speedup, TARGET, spread=ratio_spread(stats), rounds=stats.pairs,
               note=f"fit/hand throughput, whole calls of {steps} steps incl. fit start-up "
                    f"(hand {hand_ms:.2f} ms/step)"),
        figure("ratio_steady", steady_s["median"], TARGET, spread=steady_s,
               note=f"fit/hand, {LOG_EVERY}-step chunks alternating inside one fit run"),
        figure("ratio_cpu_time", spread_of(cpu_ratios)["median"], spread=spread_of(cpu_ratios),
               note="whole calls, process CPU time"),
        figure("ratio_steady_cpu_time", spread_of(steady_cpu)["median"], spread=spread_of(steady_cpu),
               note="steady-state chunks, process CPU time"),
        figure("overhead_us_per_step", overhead["median"], spread=overhead, unit="us",
               note="whole calls: median per-pair (t_fit - t_hand) / steps"),
        figure("overhead_us_per_step_steady", spread_of(steady_us)["median"], spread=spread_of(steady_us),
               unit="us", note="steady state: median per-chunk (t_fit - t_hand) / 10"),
        figure("startup_ms", start["median"], spread=start, unit="ms",
               note="fit(max_steps=1) - hand(1): optimizer, loader, monitor, model.pt + summary"),
        figure("epoch_end_ms", spread_of(epoch_ms)["median"], spread=spread_of(epoch_ms), unit="ms",
               note="what an epoch end adds with out_dir (checkpoint + fsync); in neither ratio"),
    ]
    short = [f["key"] for f in figures if f["met"] is False]
    note = (f"fit (bar on, JSONL+TensorBoard every {LOG_EVERY} steps) vs a bare hand loop on a ~{hand_ms:.1f} "
            f"ms step: fit adds ~{spread_of(steady_us)['median']:.0f} us/step in steady state and "
            f"~{start['median']:.0f} ms per call")
    if short:
        note += f"; SHORT: {', '.join(short)} (see the issue note for where the time goes)"
    return record(BENCH, figures, note=note, quick=bool(args.quick), steps_per_call=steps, chunks=len(steady),
                  batch_size=bs, model=f"mlp hidden={list(hidden)}", hand_ms_per_step=hand_ms,
                  fit_ms_per_step=stats.median_b / steps * 1e3,
                  steady_hand_ms_per_step=spread_of(steady_hand_ms)["median"],
                  steady_fit_ms_per_step=spread_of(steady_fit_ms)["median"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
