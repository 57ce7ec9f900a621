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
``ratio_steady`` (informational)
    One long ``fit`` run whose callback (called with each 10-step metrics record) runs 10 hand-loop
    steps on a second copy of the model, so fit's 10 steps (with its logging) and the hand loop's 10
    steps alternate every ~30 ms: the median of per-chunk t_hand / t_fit. It cancels the machine's drift
    far better, but it shares between the two halves whatever does not stay inside a chunk (background
    threads, cache and allocator state left by the other half), and here it has read consistently
    higher than ``ratio`` (0.97-0.99 against 0.86-0.98 for whole calls). A real run is fit alone, so
    the target is judged on ``ratio``; use this one to locate per-step costs.

On this shared 2-core machine the whole-call median moves from run to run by more than the 2% the
target allows: five full runs while this benchmark was written gave 0.98, 0.93, 0.86, 0.90 and 0.99
(per-pair ratios spanning about 0.6-1.3 within each run). Read ``ratio`` with its spread.

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
# 1 thread only: at 2 threads this machine's eager stalls (a neighbour takes a core) swamp a ~2% effect --
# a 2-thread run here gave per-pair ratios from 0.13 to 2.3. Run `--threads 2` by hand on a quiet machine.
THREADS = (1,)
TARGET = ">= 0.98"
LOG_EVERY = 10
# What was tried when the ratio fell short (an investigation on this machine, torch 2.13, at the time of
# writing; rerun the ablation before trusting it for a later fit).
TRIED = (
    "Tried: 600-step whole calls and 10-step chunks interleaved inside one run (the latter reads 0.97-0.99); "
    "ablations: the bar, JSONL and TensorBoard logging each cost about 1% or less, and fit with all of "
    "them off is still ~5-10% slower per step than the hand loop in whole calls (process CPU time, "
    "800-step calls), where cProfile shows the same ops (backward, linear, optimizer step) running slower "
    "rather than new Python work; an earlier revision's per-step glue (loss split/count/window share, "
    "moves) cost ~5% in a hand-loop replica. Start-up is 20-40 ms per call"
)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per whole call (default 600; 100 with --quick)",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        default=None,
        help="10-step chunk pairs in the steady-state run (default 300; 30 with --quick)",
    )
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
    ds = tk.create_dataset(
        "synthetic", "train", task="classification", n=n_items, features=64, num_classes=10
    )
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

    def fit(
        n: int = steps, out_dir: Path = tmp / "fit", epochs: int = 1, data: Any = ds, callbacks: tuple = ()
    ) -> Any:
        with throwaway_terminal():
            return tk.fit(
                fit_model,
                data,
                batch_size=bs,
                max_steps=n,
                epochs=epochs,
                progress="on",
                out_dir=str(out_dir),
                log_every=LOG_EVERY,
                flops=False,
                callbacks=callbacks,
            )

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
        log(
            f"[{BENCH}] mlp {hidden} batch {bs}, threads {torch.get_num_threads()}: "
            f"whole calls of {steps} steps ..."
        )
        stats = interleaved_ratio(
            cpu_timed(hand, cpu_a),
            cpu_timed(fit, cpu_b),
            warmup=warmup,
            min_pairs=5 if args.quick else 8,
            max_pairs=8 if args.quick else 20,
            target_iqr=0.02,
            max_time_s=12.0 if args.quick else 60.0,
        )
        cpu_ratios = [a / b for a, b in zip(cpu_a[warmup:], cpu_b[warmup:], strict=True) if b > 0]
        diffs_us = [(tb - ta) / steps * 1e6 for ta, tb in zip(stats.times_a, stats.times_b, strict=True)]

        # Keep the steady-state run to a time budget: a busy machine (or 2 stalling threads) slows steps.
        budget_s = 8.0 if args.quick else 45.0
        step_s = max(stats.median_a, stats.median_b) / steps
        chunks = max(20, min(chunks, int(budget_s / (2 * LOG_EVERY * step_s))))
        fit_steps_steady = LOG_EVERY * (chunks + chunk_warmup + 1)
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
        startup = interleaved_ratio(
            lambda: hand(1),
            lambda: fit(1),
            warmup=2,
            min_pairs=5,
            max_pairs=15,
            target_iqr=0.05,
            max_time_s=5.0,
        )
        startup_ms = [(tb - ta) * 1e3 for ta, tb in zip(startup.times_a, startup.times_b, strict=True)]

        # The same 10 steps, ending by max_steps (no checkpoint) or at a 10-batch epoch end (checkpoint).
        # (two small datasets of nearly the same size, so the samplers' shuffles cost the same).
        exact = torch.utils.data.Subset(ds, range(bs * LOG_EVERY))
        longer = torch.utils.data.Subset(ds, range(bs * (LOG_EVERY + 1)))
        epoch = interleaved_ratio(
            lambda: fit(LOG_EVERY, tmp / "noepoch", data=longer),
            lambda: fit(LOG_EVERY, tmp / "epoch", data=exact),
            warmup=1,
            min_pairs=5,
            max_pairs=7 if args.quick else 11,
            target_iqr=0.05,
            max_time_s=5.0,
        )
        epoch_ms = [(tb - ta) * 1e3 for ta, tb in zip(epoch.times_a, epoch.times_b, strict=True)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    hand_ms = stats.median_a / steps * 1e3
    overhead = spread_of(diffs_us)
    steady_s = spread_of(steady)
    start = spread_of(startup_ms)
    figures = [
        figure(
            "ratio",
            stats.speedup,
            TARGET,
            spread=ratio_spread(stats),
            rounds=stats.pairs,
            note=f"fit/hand throughput, whole calls of {steps} steps incl. fit start-up "
            f"(hand {hand_ms:.2f} ms/step)",
        ),
        figure(
            "ratio_steady",
            steady_s["median"],
            spread=steady_s,
            note=f"fit/hand, {LOG_EVERY}-step chunks alternating inside one fit run (shares background and "
            "cache effects between the halves; reads high)",
        ),
        figure(
            "ratio_cpu_time",
            spread_of(cpu_ratios)["median"],
            spread=spread_of(cpu_ratios),
            note="whole calls, process CPU time",
        ),
        figure(
            "ratio_steady_cpu_time",
            spread_of(steady_cpu)["median"],
            spread=spread_of(steady_cpu),
            note="steady-state chunks, process CPU time",
        ),
        figure(
            "overhead_us_per_step",
            overhead["median"],
            spread=overhead,
            unit="us",
            note="whole calls: median per-pair (t_fit - t_hand) / steps",
        ),
        figure(
            "overhead_us_per_step_steady",
            spread_of(steady_us)["median"],
            spread=spread_of(steady_us),
            unit="us",
            note="steady state: median per-chunk (t_fit - t_hand) / 10",
        ),
        figure(
            "startup_ms",
            start["median"],
            spread=start,
            unit="ms",
            note="fit(max_steps=1) - hand(1): optimizer, loader, monitor, model.pt + summary",
        ),
        figure(
            "epoch_end_ms",
            spread_of(epoch_ms)["median"],
            spread=spread_of(epoch_ms),
            unit="ms",
            note="what an epoch end adds with out_dir (checkpoint + fsync); in neither ratio",
        ),
    ]
    note_noise = (
        "run-to-run the whole-call median has varied 0.86-0.99 here (noisy shared machine; see the "
        "per-pair spread)"
    )
    short = [f["key"] for f in figures if f["met"] is False]
    note = (
        f"fit (bar on, JSONL+TensorBoard every {LOG_EVERY} steps) vs a bare hand loop on a ~{hand_ms:.1f} "
        f"ms step: fit adds ~{spread_of(steady_us)['median']:.0f} us/step in steady state and "
        f"~{start['median']:.0f} ms per call; {note_noise}"
    )
    if short:
        note += f"; SHORT: {', '.join(short)}. " + TRIED
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        steps_per_call=steps,
        chunks=len(steady),
        batch_size=bs,
        model=f"mlp hidden={list(hidden)}",
        hand_ms_per_step=hand_ms,
        fit_ms_per_step=stats.median_b / steps * 1e3,
        steady_hand_ms_per_step=spread_of(steady_hand_ms)["median"],
        steady_fit_ms_per_step=spread_of(steady_fit_ms)["median"],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
