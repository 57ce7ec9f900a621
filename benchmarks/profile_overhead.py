"""Profiling overhead: a gpt-tiny training step recorded by the profiler against the same step unprofiled.

Model: gpt-tiny (defaults: 4 layers, n_embd 128, 4 heads, sequence 128) at batch 8; ``--quick``: 2 layers,
sequence 64, batch 4. fp32, random token ids and targets (a step's cost depends on shapes, not values).
One step = forward, cross-entropy, backward, fused AdamW step, ``zero_grad``. Both sides run the same
step function on the same model and batch.

``ratio``
    Median over interleaved pairs (``interleaved_ratio``: A B / B A ...) of t_profiled / t_unprofiled;
    above 1 means profiling slows the step. *unprofiled*: the step alone. *profiled*: the step inside a
    ``torch.profiler.profile`` session with ``tk.profile``'s settings (CPU activity, ``record_shapes``,
    ``profile_memory``) and its ``module::<name>`` ranges (forward hooks on every module, via
    ``torchkiln.measure.module_ranges``); the session is started before and stopped after the step, so
    its start and stop (Kineto collecting the step's events) are included, the analysis afterwards
    (``key_averages``, trace export) is not. Informational: no target.
``ratio_in_tk_profile``
    What ``tk.profile`` reports itself: its profiled step time (the ``ProfilerStep`` ranges of one
    continuous session) over its unprofiled ``step_ms`` (timed right after, hooks removed); median over
    a few calls. Steady-state per-step overhead, without a session's start and stop.
``profile_call_s``
    Wall time of one whole ``tk.profile`` call (wait 1, warm-up 1, active 3; FLOP count, tables, trace
    written; no MFU peak), median over the calls: what a user waits for.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from typing import Any

from benchmarks._common import figure, log, ratio_spread, record, run_benchmark, spread_of

BENCH = "profile_overhead"
THREADS = (1,)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=None, help="default 8; 4 with --quick")
    parser.add_argument(
        "--calls", type=int, default=None, help="tk.profile calls (default 3; 2 with --quick)"
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import torchkiln as tk
    from torchkiln.measure import interleaved_ratio, module_ranges, profile

    cfg = {"n_layer": 2, "seq_len": 64} if args.quick else {"n_layer": 4, "seq_len": 128}
    bs = args.batch_size or (4 if args.quick else 8)
    calls = args.calls or (2 if args.quick else 3)
    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", **cfg)
    vocab = model.vocab_size
    x = torch.randint(0, vocab, (bs, cfg["seq_len"]))
    y = torch.randint(0, vocab, (bs, cfg["seq_len"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))

    def step() -> None:
        loss = loss_fn(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def profiled_step() -> None:
        with (
            module_ranges(model),
            torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True),
        ):
            step()

    log(
        f"[{BENCH}] gpt-tiny {cfg} batch {bs}, threads {torch.get_num_threads()}: "
        "unprofiled vs profiled steps, interleaved ..."
    )
    stats = interleaved_ratio(
        step,
        profiled_step,
        warmup=2,  # the first profiler session in a process initialises Kineto (seconds)
        min_pairs=5 if args.quick else 8,
        max_pairs=8 if args.quick else 20,
        target_iqr=0.05,
        max_time_s=15.0 if args.quick else 90.0,
    )

    log(f"[{BENCH}] {calls} tk.profile calls ...")
    in_profile, call_s = [], []
    tmp = tempfile.mkdtemp(prefix="kiln-bench-profile-")
    try:
        for i in range(calls):
            t0 = time.perf_counter()
            res = profile(model, (x,), loss_fn=loss_fn, optimizer=opt, out_dir=f"{tmp}/{i}", peak=None)
            call_s.append(time.perf_counter() - t0)
            if res.profiled_step_ms and res.step_ms:
                in_profile.append(res.profiled_step_ms / res.step_ms)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    unprofiled_ms = stats.median_a * 1e3
    profiled_ms = stats.median_b * 1e3
    in_spread, call_spread = spread_of(in_profile), spread_of(call_s)
    figures = [
        figure(
            "ratio",
            stats.time_ratio,
            spread=ratio_spread(stats, "time_ratios"),
            rounds=stats.pairs,
            note=f"profiled / unprofiled step, session start+stop included "
            f"(unprofiled {unprofiled_ms:.1f} ms, profiled {profiled_ms:.1f} ms)",
        ),
        figure(
            "ratio_in_tk_profile",
            in_spread.get("median"),
            spread=in_spread,
            note="tk.profile's own profiled_step_ms / step_ms (steady state inside one session)",
        ),
        figure(
            "profile_call_s",
            call_spread.get("median"),
            spread=call_spread,
            unit="s",
            note="one whole tk.profile call: 1+1+3 steps, FLOPs, tables, trace, timing (no MFU peak)",
        ),
        figure(
            "unprofiled_step_ms", unprofiled_ms, unit="ms", rounds=stats.pairs, note="median, interleaved"
        ),
        figure("profiled_step_ms", profiled_ms, unit="ms", rounds=stats.pairs, note="median, interleaved"),
    ]
    note = (
        f"gpt-tiny {cfg} batch {bs}: a profiled step (record_shapes, profile_memory, module ranges, "
        f"session start/stop) takes {stats.time_ratio:.2f}x an unprofiled one; informational, no target"
    )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        model=f"gpt-tiny {cfg}",
        batch_size=bs,
        method="interleaved_ratio(step, profiled_step); tk.profile(peak=None) calls",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
