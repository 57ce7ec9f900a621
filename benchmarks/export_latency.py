"""Inference latency of each export format against eager PyTorch, interleaved in one process.

For resnet-tiny (8x8 digits) and gpt-tiny (its defaults: 4 layers, n_embd=128, 128 tokens) at batch 1 and
32, each artifact written by ``tk.export`` (BatchNorm folded, dynamic batch, verified) is loaded with
``tk.load_predictor`` and called like a user would: eager (the unfused model, through the same
Predictor wrapper, under ``torch.inference_mode``), ``torchscript`` (frozen; optimize_for_inference at
load), ``export`` (``torch.export.load(...).module()``, eager kernels), ``aoti`` (AOTInductor package,
when a C++ compiler exists; full runs only: each compile takes a minute here) and ``onnx`` (ONNX
Runtime, all graph optimizations). For resnet-tiny ``eager_fused`` (``tk.fuse``: BatchNorm folded,
still eager) is measured too.

One thread everywhere (torch and ONNX Runtime intra-op). Each round calls every variant once, the order
reversed on odd rounds; ``speedup_<format>_<model>_b<batch>`` is the median over rounds of
t_eager / t_variant. ONNX Runtime's pool threads spin for a while after a run (BENCHMARKING.md), so
an untimed 40 ms gap follows every ORT call. No targets: the figures are informational; the headline
``speedup_best`` is the best of them, named in its note.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import figure, log, record, run_benchmark, spread_of, use_private_inductor_cache

BENCH = "export_latency"
THREADS = (1,)
ORT_GAP_S = 0.04
SHORT = {"resnet-tiny": "resnet", "gpt-tiny": "gpt"}


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-aoti", action="store_true", help="skip AOTInductor (a compile per model)")
    parser.add_argument("--max-time-s", type=float, default=None, help="time budget per model and batch")


def _interleave(fns: dict[str, Any], gaps: dict[str, float], *, min_rounds: int, max_time_s: float) -> dict:
    """Round-robin timing (order reversed on odd rounds), an untimed sleep after the callables in
    ``gaps``; stops after ``min_rounds`` once every ratio's IQR/median is under 10 %, or at the budget.

    A sub-millisecond call is timed as a run of ``inner`` back-to-back calls (the same count for every
    variant, chosen so the baseline's run takes ~5 ms): one scheduler hiccup then moves a sample by a
    fraction instead of many times over.
    """
    from torchkiln.measure.timing import percentile, timed_call

    names = list(fns)
    for name in names:  # warm-up: two calls each
        for _ in range(2):
            fns[name]()
        time.sleep(gaps.get(name, 0.0))
    one = min(timed_call(fns[names[0]]) for _ in range(5))
    inner = max(1, min(200, int(0.005 / max(one, 1e-6))))

    def run(fn: Any) -> None:
        for _ in range(inner):
            fn()

    times: dict[str, list[float]] = {n: [] for n in names}
    start, rounds = time.perf_counter(), 0
    while True:
        for name in names if rounds % 2 == 0 else names[::-1]:
            times[name].append(timed_call(lambda f=fns[name]: run(f)) / inner)
            if gaps.get(name):
                time.sleep(gaps[name])
        rounds += 1
        if rounds >= min_rounds:
            ratios = [[b / t for b, t in zip(times[names[0]], times[n], strict=True)] for n in names[1:]]
            spreads = [(percentile(r, 75) - percentile(r, 25)) / percentile(r, 50) for r in ratios]
            if all(s < 0.10 for s in spreads) or time.perf_counter() - start > max_time_s:
                break
    base = times[names[0]]
    return {
        "rounds": rounds,
        "inner": inner,
        "ms": {n: percentile(t, 50) * 1e3 for n, t in times.items()},
        "speedups": {n: [b / t for b, t in zip(base, times[n], strict=True)] for n in names[1:]},
    }


def _predictors(model_name: str, root: Path, formats: list[str]) -> tuple[Any, dict[str, Any], dict]:
    import torch

    import torchkiln as tk
    from torchkiln.export import Predictor, load_predictor

    torch.manual_seed(0)
    model = tk.create_model(model_name).eval()
    example = model.example_inputs(2)
    result = None
    preds: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for fmt in formats:
        t0 = time.perf_counter()
        result = tk.export(model, example, root / f"{model_name}-{fmt}", format=fmt, verbose=False)
        preds[fmt] = load_predictor(result.path, threads=1)
        info[fmt] = {
            "export_s": round(time.perf_counter() - t0, 2),
            "size_mb": round(result.size_bytes / 1e6, 3),
            "max_abs_error": result.max_abs_error,
        }
        log(
            f"[{BENCH}] {model_name} {fmt}: exported in {info[fmt]['export_s']} s, "
            f"max abs error {result.max_abs_error:.2g}"
        )
    specs, outputs = result.input_specs, result.output_names
    eager = {"eager": Predictor("eager", Path("<memory>"), model, specs, outputs)}
    if model_name == "resnet-tiny":
        eager["eager_fused"] = Predictor("eager", Path("<memory>"), tk.fuse(model), specs, outputs)
    return model, {**eager, **preds}, info


def measure(args: argparse.Namespace) -> dict[str, Any]:
    use_private_inductor_cache()
    import torch

    from torchkiln.export import aoti_unavailable_reason

    torch.set_num_threads(args.threads)
    formats = ["torchscript", "export", "onnx"]
    aoti_note = ""
    reason = aoti_unavailable_reason()
    if args.quick or args.no_aoti:
        aoti_note = "aoti skipped (--quick/--no-aoti: a compile per model takes ~1 min here)"
    elif reason:
        aoti_note = f"aoti skipped: {reason}"
    else:
        formats.insert(2, "aoti")
    budget = args.max_time_s or (3.0 if args.quick else 20.0)
    min_rounds = 8 if args.quick else 20

    figures: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-export-bench-") as tmp:
        for model_name in ("resnet-tiny", "gpt-tiny"):
            model, preds, info = _predictors(model_name, Path(tmp), formats)
            details[model_name] = {"export": info}
            for bs in (1, 32):
                inputs = model.example_inputs(bs)
                fns = {name: (lambda p=p, x=inputs: p(*x)) for name, p in preds.items()}
                gaps = {"onnx": ORT_GAP_S}
                log(f"[{BENCH}] {model_name} batch {bs}: {', '.join(fns)} ...")
                res = _interleave(fns, gaps, min_rounds=min_rounds, max_time_s=budget)
                details[model_name][f"b{bs}"] = {
                    "rounds": res["rounds"],
                    "calls_per_sample": res["inner"],
                    "p50_ms": res["ms"],
                }
                for name, ratios in res["speedups"].items():
                    spread = spread_of(ratios)
                    label = "fused_eager" if name == "eager_fused" else name
                    figures.append(
                        figure(
                            f"speedup_{label}_{SHORT[model_name]}_b{bs}",
                            spread["median"],
                            spread=spread,
                            rounds=res["rounds"],
                            note=f"{model_name} batch {bs}: eager {res['ms']['eager']:.3g} ms, "
                            f"{name} {res['ms'][name]:.3g} ms (p50)",
                            unit="x",
                        )
                    )
    best = max(figures, key=lambda f: f["value"] or 0.0)
    headline = figure(
        "speedup_best",
        best["value"],
        spread=best["spread"],
        rounds=best["rounds"],
        note=f"best of the formats: {best['key']} ({best['note']})",
        unit="x",
    )
    worst = min(figures, key=lambda f: f["value"] or 0.0)
    note = (
        f"1 thread; best {best['key']} {best['value']:.2f}x, worst {worst['key']} {worst['value']:.2f}x. "
        + aoti_note
    )
    return record(BENCH, [headline, *figures], note=note.strip(), formats=formats, details=details)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
