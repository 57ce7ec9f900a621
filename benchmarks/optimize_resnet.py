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

from benchmarks._common import log, run_benchmark, use_private_inductor_cache
from benchmarks._optimize import candidate_logger, chosen_figures, objective_figures, optimize_record

BENCH = "optimize_resnet"
THREADS = (1,)
SPEEDUP_TARGET = ">= 4"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)


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
        kwargs: dict[str, Any] = dict(
            model=model,
            example_inputs=x[:bs],
            evaluator=accuracy_evaluator(x, y, bs),
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
            on_result=candidate_logger(
                BENCH, lambda r: f"{r.speedup:.2f}x acc {100 * (r.accuracy or 0):.2f}%"
            ),
        )
        result = optimize(**kwargs)
        # the same cache, ranked by the other objectives (nothing is measured again)
        others = objective_figures(
            result, lambda o: optimize(**{**kwargs, "objective": o, "on_result": None})
        )
    figures = chosen_figures(result, f"digits val ({len(x)} samples)", SPEEDUP_TARGET) + others
    met = "met" if figures[0]["met"] and figures[1]["met"] else "missed"
    return optimize_record(
        BENCH,
        result,
        figures,
        f"{result.message}; target {SPEEDUP_TARGET} {met}",
        batch_size=bs,
        trained=trained,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
