"""Model FLOP utilisation of gpt-tiny training at bf16, from fit()'s own FLOP and MFU reporting.

``tk.fit(gpt-tiny, pycode, precision="bf16", flops=True, max_steps=K)`` counts the FLOPs of one
training step on its first micro-batch (``FlopCounterMode``: forward + backward, a multiply-add is 2
FLOPs), times the steps after the first, and divides the achieved FLOP/s by this machine's measured bf16
GEMM peak at the same thread count (``torchkiln.measure.peak_flops``: large ``torch.mm``, as ``kiln
env`` measures it; re-measured at the start of each run and written to the cache fit reads, unless
``--cached-peak``). Several fit calls give the rounds; ``mfu`` is their median.

Two caveats, both reported: FlopCounterMode has no formula for the CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so attention's matmuls are not in fit's count --
``mfu_with_attention`` adds them analytically (4·B·T²·C per layer forward, twice that backward, full
T² as is conventional); and fit's throughput clock covers each step's data, forward, backward and
optimizer step but not its progress/metrics bookkeeping (off here).
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._common import figure, log, record, run_benchmark, spread_of

BENCH = "train_mfu"
THREADS = (1, 2)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per fit call (default 16)")
    parser.add_argument(
        "--cached-peak",
        action="store_true",
        help="use the cached peak when there is one (default: re-measure it now, under today's load)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="fit calls (default 3; 1 with --quick)")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import torchkiln as tk
    from torchkiln.measure import cached_peak_flops, peak_flops

    steps = args.steps or (6 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 3)
    cfg = {"n_embd": 128, "n_layer": 4, "n_head": 4, "seq_len": 128}
    bs = 32
    threads = torch.get_num_threads()
    # Re-measured by default (and written back to the cache fit reads): a peak cached under a busier
    # (or quieter) moment would skew MFU either way.
    peak_cached = {
        "bfloat16": args.cached_peak and cached_peak_flops(torch.bfloat16, "cpu") is not None,
        "float32": args.cached_peak and cached_peak_flops(torch.float32, "cpu") is not None,
    }
    log(
        f"[{BENCH}] peak GEMM FLOP/s at {threads} thread(s) "
        f"({'cached' if all(peak_cached.values()) else 'measuring'}) ..."
    )
    peak_bf16 = peak_flops(torch.bfloat16, "cpu", refresh=not args.cached_peak)
    peak_fp32 = peak_flops(torch.float32, "cpu", refresh=not args.cached_peak)

    data = tk.create_dataset("pycode", "train", seq_len=cfg["seq_len"])
    results = []
    for r in range(rounds):
        torch.manual_seed(r)
        model = tk.create_model("gpt-tiny", **cfg)
        log(f"[{BENCH}] round {r + 1}/{rounds}: fit bf16, {steps} steps ...")
        results.append(
            tk.fit(
                model,
                data,
                batch_size=bs,
                max_steps=steps,
                epochs=1,
                precision="bf16",
                flops=True,
                progress="off",
                seed=r,
            )
        )
    res = results[-1]
    if res.mfu is None:
        raise RuntimeError(f"fit reported no MFU (uncounted: {res.uncounted_ops})")
    mfus = [r.mfu for r in results]
    achieved = [r.achieved_flops_per_s for r in results]
    # Attention matmuls FlopCounterMode could not see: QK^T and AV, forward 2 * 2*B*T*T*C per layer.
    b, t, c, n_layer = bs, cfg["seq_len"], cfg["n_embd"], cfg["n_layer"]
    attn_flops_per_step = 3 * 4 * b * t * t * c * n_layer
    attn_counted = not any("scaled_dot_product" in op for op in res.uncounted_ops)
    extra_per_sample = 0 if attn_counted else attn_flops_per_step / b
    mfus_attn = [
        (r.flops_per_sample + extra_per_sample) * r.samples_per_s / r.peak_flops_per_s for r in results
    ]
    spread = spread_of(mfus)
    figures = [
        figure(
            "mfu",
            spread["median"],
            spread=spread,
            rounds=len(mfus),
            note=f"fit(precision=bf16, flops=True): {spread_of(achieved)['median'] / 1e9:.1f} GFLOP/s "
            f"achieved / {peak_bf16 / 1e9:.1f} GFLOP/s bf16 peak",
        ),
        figure(
            "mfu_with_attention",
            spread_of(mfus_attn)["median"],
            spread=spread_of(mfus_attn),
            rounds=len(mfus_attn),
            note="adds the attention matmuls FlopCounterMode skips on CPU"
            if not attn_counted
            else "attention was counted by FlopCounterMode: same as mfu",
        ),
        figure(
            "achieved_gflops",
            spread_of(achieved)["median"] / 1e9,
            spread=spread_of([a / 1e9 for a in achieved]),
            unit="GFLOP/s",
            rounds=len(achieved),
            note="fit's flops_per_sample x samples_per_s",
        ),
        figure(
            "peak_bf16_gflops",
            peak_bf16 / 1e9,
            unit="GFLOP/s",
            rounds=1,
            note=f"measured torch.mm peak, {threads} thread(s)"
            f"{' (cached)' if peak_cached['bfloat16'] else ''}",
        ),
        figure(
            "peak_fp32_gflops",
            peak_fp32 / 1e9,
            unit="GFLOP/s",
            rounds=1,
            note=f"for reference{' (cached)' if peak_cached['float32'] else ''}",
        ),
    ]
    note = (
        f"gpt-tiny defaults, batch {bs}x{cfg['seq_len']}, bf16 autocast: MFU {spread['median']:.1%} of the "
        f"measured bf16 peak ({peak_bf16 / 1e9:.0f} GFLOP/s at {threads} thread(s)); source: fit's flops/MFU "
        "reporting; informational, no target"
    )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        model=f"gpt-tiny {cfg}",
        batch_size=bs,
        steps_per_round=steps,
        method="fit(flops=True): FlopCounterMode count x fit samples_per_s / peak_flops(bfloat16)",
        flops_per_step=res.flops_per_step,
        flops_per_sample=res.flops_per_sample,
        samples_per_s=spread_of([r.samples_per_s for r in results])["median"],
        peak_flops_per_s={"bfloat16": peak_bf16, "float32": peak_fp32},
        peak_cached=peak_cached,
        uncounted_ops=res.uncounted_ops,
        attention_flops_per_step_uncounted=0 if attn_counted else attn_flops_per_step,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
