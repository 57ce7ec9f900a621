"""``tk.optimize`` on resnet-tiny (3x32x32 digits): the chosen candidate against fp32 eager, batch 32,
within a 1-point accuracy budget.

The model and its cached trained weights are those of ``quant_static_cnn`` (resnet-tiny widths 32/64/128,
6 epochs on the digits upsampled to 3x32x32, cached in ``.cache/bench-models``). ``tk.optimize`` measures
every candidate (bf16 autocast, channels_last, torch.compile with freezing, TorchScript, ONNX Runtime,
static PT2E int8 eager/compiled, channel pruning 0.5 + a distillation fine-tune + int8) interleaved with
fp32 eager at batch 32 and evaluates its accuracy on the digits validation split; it picks the fastest
within 1 point. ``speedup``: the chosen one's median per-round t_fp32_eager / t_chosen; ``acc_drop_pt``:
fp32 minus chosen accuracy in points; ``size_ratio``: the chosen artifact's bytes / the fp32 state_dict's.
``--quick``: no compile candidates, no pruning, short timing (under a minute).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from benchmarks._common import figure, log, record, run_benchmark, use_private_inductor_cache

BENCH = "optimize_resnet"
THREADS = (1,)
SPEEDUP_TARGET = ">= 4"
DROP_TARGET = "<= 1.0"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)


def chosen_figures(result: Any, what: str) -> list[dict[str, Any]]:
    """speedup / acc_drop_pt / size_ratio of an OptimizeResult's choice (the baseline when none won)."""
    c, b = result.chosen or result.baseline, result.baseline
    spread = {
        "min": c.speedup_min,
        "q1": c.speedup_q1,
        "median": c.speedup,
        "q3": c.speedup_q3,
        "max": c.speedup_max,
        "n": c.rounds,
    }
    return [
        figure(
            "speedup",
            c.speedup,
            SPEEDUP_TARGET,
            spread=spread,
            rounds=c.rounds,
            note=f"{c.key} vs fp32 eager, batch {result.batch_size}, interleaved "
            f"({c.measured_latency_ms or 0:.2f} ms vs {c.baseline_latency_ms or 0:.2f} ms)",
        ),
        figure(
            "acc_drop_pt",
            100 * ((b.accuracy or 0) - (c.accuracy or 0)),
            DROP_TARGET,
            unit="pt",
            note=f"{what}: fp32 {100 * (b.accuracy or 0):.2f}%, {c.key} {100 * (c.accuracy or 0):.2f}%",
        ),
        figure(
            "size_ratio",
            (c.size_bytes or 0) / b.size_bytes if b.size_bytes else None,
            note=f"{c.key} artifact {c.size_bytes} B / fp32 state_dict {b.size_bytes} B",
        ),
        figure(
            "candidates",
            float(sum(r.status == "ok" for r in result.candidates)),
            note="measured; skipped: "
            + "; ".join(f"{r.key} ({r.why[:80]})" for r in result.candidates if r.status != "ok"),
        ),
    ]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    use_private_inductor_cache()
    from benchmarks.quant_static_cnn import _images, _trained_model
    from torchkiln.optimize import accuracy_evaluator, optimize

    bs = args.batch_size
    train, val = _images("train"), _images("val")
    model, trained = _trained_model(6)
    x, y = val.tensors
    with tempfile.TemporaryDirectory(prefix="kiln-bench-opt-") as tmp:
        log(f"[{BENCH}] optimize resnet-tiny 3x32x32, batch {bs}, budget 1 pt ...")
        result = optimize(
            model,
            x[:bs],
            accuracy_evaluator(x, y, bs),
            accuracy_budget=0.01,
            batch_size=bs,
            train_data=train,
            compile=not args.quick,
            prune_ratios=() if args.quick else (0.5,),
            distill_epochs=3,
            quick=args.quick,
            measure_s=1.0 if args.quick else 6.0,
            out_dir=tmp,
            export_chosen=False,
            report=False,
            on_result=lambda r: log(
                f"[{BENCH}]   {r.key}: {r.status} "
                + (
                    f"{r.speedup:.2f}x acc {100 * (r.accuracy or 0):.2f}%"
                    if r.status == "ok"
                    else r.why[:120]
                )
            ),
        )
    figures = chosen_figures(result, f"digits val ({len(x)} samples)")
    sp, drop = figures[0]["value"], figures[1]["value"]
    return record(
        BENCH,
        figures,
        note=f"{result.message}; target {SPEEDUP_TARGET} {'met' if sp >= 4 and drop <= 1 else 'missed'}",
        batch_size=bs,
        trained=trained,
        chosen=result.chosen.key if result.chosen else None,
        front=result.front,
        table={
            r.key: {"status": r.status, "speedup": r.speedup, "accuracy": r.accuracy}
            for r in result.candidates
        },
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
