"""Dynamic int8 on a BERT-style encoder with realistic activation outliers: every backend vs fp32 eager.

A Hugging Face ``BertModel`` built from a config (6 layers, hidden 768, 12 heads, FFN 3072 -- DistilBERT's
dimensions -- vocabulary 8000;
random weights, nothing downloaded) gets "massive activations" injected
(:func:`~torchkiln.compress.outliers.inject_activation_outliers`: the first token carries a huge value in
one residual dimension, so the inputs of every FFN output projection reach max/mean |x| of several
hundred, as in trained transformers). Inputs: random token ids, sequence length 128, batch 1 and 32.

Variants, each from ``tk.quantize(model, Int8Dynamic(backend=...))`` (the FFN/attention Linear layers; the
pooler, the last Linear, kept float):

* ``torchao`` -- int8 per-token activations x per-channel weights, ``torch.compile`` with freezing;
* ``eager`` -- ``torch.ao.quantization.quantize_dynamic`` (fbgemm/x86), eager;
* ``onnxruntime`` -- dynamo ONNX export, ORT per-channel int8, a 1-thread ``InferenceSession``;
* ``torchao_autotune`` -- the same int8 model compiled with ``max_autotune`` (inductor's C++ GEMM template
  with AMX micro-kernels, autotuned against oneDNN per shape; full runs only, compile takes minutes);
* ``fp32_compile`` -- the float model compiled the same way as ``torchao`` (for like with like; full
  runs only).

All are timed interleaved in one process against fp32 eager (rounds alternate the order; before every
call an idle gap of 50 ms lets ONNX Runtime's spinning pool threads go quiet, BENCHMARKING.md). Per
batch size the *best* backend is the fastest whose output cosine similarity to fp32 is >= 0.99 (the
fastest overall when none is). ``speedup_b1`` / ``speedup_b32``: its median per-round t_fp32 / t_int8;
``cosine``: the lower of the two best backends' cosines. Every backend's figures are reported.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks._bert import bert_encoder
from benchmarks._common import figure, log, record, run_benchmark, spread_of, use_private_inductor_cache

BENCH = "quant_dynamic_transformer"
THREADS = (1,)
TARGETS = {"speedup_b1": ">= 4", "speedup_b32": ">= 3", "cosine": ">= 0.99"}
GAP_S = 0.05
# inductor's C++ GEMM template (AMX micro-kernels for u8 x s8) autotuned against oneDNN qlinear per shape
AUTOTUNE = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default 6, quick 2)")
    parser.add_argument("--hidden", type=int, default=None, help="width (default 768, quick 384)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--backends", nargs="+", default=["torchao", "eager", "onnxruntime"], help="int8 backends to run"
    )
    parser.add_argument(
        "--autotune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also torchao compiled with max-autotune (default: on, off with --quick; +2 min of compile)",
    )


def _interleave(
    fns: dict[str, Callable[[], Any]], *, rounds: int, max_time_s: float, warmup: int = 2
) -> dict[str, list[float]]:
    """Rounds of one timed call per variant (order reversed every other round), an idle gap before each."""
    from torchkiln.measure.timing import timed_call

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            time.sleep(GAP_S)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < rounds or (r < 3 * rounds and time.perf_counter() - start < max_time_s / 2):
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(GAP_S)
            times[name].append(timed_call(fns[name]))
        r += 1
        if r >= rounds and time.perf_counter() - start > max_time_s:
            break
    return times


def _cosine(a: Any, b: Any) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    use_private_inductor_cache()
    import torch

    import torchkiln as tk
    from torchkiln.compress.outliers import activation_outlier_ratio, inject_activation_outliers
    from torchkiln.compress.quantize import Int8Dynamic, compile_frozen

    layers = args.layers or (2 if args.quick else 6)
    seq = args.seq_len
    hidden = args.hidden or (384 if args.quick else 768)
    model = bert_encoder(layers, hidden, seq)
    info = inject_activation_outliers(model)
    probe = torch.randint(0, 8000, (2, seq))
    ratios = activation_outlier_ratio(model, (probe,), info["ffn_out_layers"])
    log(
        f"[{BENCH}] BERT {layers}x{hidden}, seq {seq}; injected outliers: max/mean |x| at the FFN "
        "output "
        f"projections {min(ratios.values()):.0f}..{max(ratios.values()):.0f}"
    )
    workdir = tempfile.mkdtemp(prefix="kiln-bench-ort-")
    quantized: dict[str, Any] = {}
    setup_s: dict[str, float] = {}
    for backend in args.backends:
        t0 = time.perf_counter()
        kwargs = {"example_inputs": (probe,), "workdir": workdir} if backend == "onnxruntime" else {}
        q = tk.quantize(model, Int8Dynamic(backend=backend, threads=torch.get_num_threads()), **kwargs)
        quantized[backend] = compile_frozen(q) if backend == "torchao" else q
        setup_s[backend] = time.perf_counter() - t0
        log(f"[{BENCH}] {backend}: quantized in {setup_s[backend]:.1f} s")
        autotune = args.autotune if args.autotune is not None else not args.quick
        if backend == "torchao" and autotune:
            quantized["torchao_autotune"] = compile_frozen(copy.deepcopy(q), AUTOTUNE)
    fp32_compiled = compile_frozen(copy.deepcopy(model))

    per_batch: dict[int, dict[str, Any]] = {}
    for bs in args.batch_sizes:
        x = torch.randint(0, 8000, (bs, seq))
        variants: dict[str, Callable[[], Any]] = {"fp32": lambda x=x: model(x)}
        for name, q in quantized.items():
            variants[name] = lambda q=q, x=x: q(x)
        if not args.quick:  # one compile fewer per batch size keeps --quick near a minute
            variants["fp32_compile"] = lambda x=x: fp32_compiled(x)
        with torch.inference_mode():
            ref = model(x)
            cos, first_call = {}, {}
            for name, fn in variants.items():
                t0 = time.perf_counter()
                out = fn()
                first_call[name] = time.perf_counter() - t0
                cos[name] = _cosine(ref, out)
            log(f"[{BENCH}] batch {bs}: cosine " + ", ".join(f"{k} {v:.5f}" for k, v in cos.items()))
            rounds = (4 if bs > 8 else 10) if args.quick else (10 if bs > 8 else 30)
            times = _interleave(variants, rounds=rounds, max_time_s=12.0 if args.quick else 60.0)
        base = times["fp32"]
        speedups = {
            name: spread_of([b / t for b, t in zip(base, ts, strict=True) if t > 0])
            for name, ts in times.items()
            if name != "fp32"
        }
        p50 = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
        int8 = [n for n in quantized]
        good = [n for n in int8 if cos[n] >= 0.99] or int8
        best = max(good, key=lambda n: speedups[n]["median"])
        per_batch[bs] = {
            "best": best,
            "speedups": speedups,
            "cosine": cos,
            "p50_ms": p50,
            "first_call_s": first_call,
            "rounds": len(base),
        }
        log(
            f"[{BENCH}] batch {bs}: "
            + ", ".join(f"{n} {speedups[n]['median']:.2f}x" for n in speedups)
            + f"; best {best}"
        )

    figures = []
    headline = {1: "speedup_b1", 32: "speedup_b32"}
    for bs, res in per_batch.items():
        key = headline.get(bs, f"speedup_b{bs}")
        best = res["best"]
        s = res["speedups"][best]
        figures.append(
            figure(
                key,
                s["median"],
                TARGETS.get(key),
                spread=s,
                rounds=s["n"],
                note=f"best int8 backend at batch {bs}: {best} (cosine {res['cosine'][best]:.4f}); "
                f"fp32 eager {res['p50_ms']['fp32']:.1f} ms, {best} {res['p50_ms'][best]:.1f} ms",
            )
        )
    worst_cos = min(per_batch[bs]["cosine"][per_batch[bs]["best"]] for bs in per_batch)
    figures.append(figure("cosine", worst_cos, TARGETS["cosine"], note="lower of the best backends' cosines"))
    for bs, res in per_batch.items():
        for name, s in res["speedups"].items():
            figures.append(
                figure(
                    f"{name}_b{bs}",
                    s["median"],
                    spread=s,
                    rounds=s["n"],
                    note=f"t_fp32_eager / t_{name} at batch {bs}, cosine {res['cosine'].get(name, 1.0):.5f}, "
                    f"p50 {res['p50_ms'][name]:.1f} ms",
                )
            )
        if "torchao" in res["speedups"] and "fp32_compile" in res["speedups"]:
            like = res["speedups"]["torchao"]["median"] / res["speedups"]["fp32_compile"]["median"]
            figures.append(
                figure(f"torchao_vs_fp32_compile_b{bs}", like, note="compiled vs compiled (like with like)")
            )
    sizes = {}
    for name, q in quantized.items():
        path = getattr(q, "path", None)
        if path is not None:
            sizes[name] = os.path.getsize(path)
    fp32_path = os.path.join(workdir, "model_fp32.onnx")
    if os.path.exists(fp32_path):
        sizes["fp32_onnx"] = os.path.getsize(fp32_path)
    short = [f["key"] for f in figures if f["met"] is False]
    note = (
        f"BERT {layers}x{hidden} seq {seq} with outliers (max/mean |x| {min(ratios.values()):.0f}+); "
        "best: " + ", ".join(f"b{bs} {r['best']}" for bs, r in per_batch.items())
    )
    if short:
        note += (
            f"; short: {', '.join(short)}. Tried: torchao int8 (per-token) under compile+freezing, also "
            "with max-autotune (inductor's C++ AMX GEMM template); the eager fbgemm quantize_dynamic; ONNX "
            "Runtime int8 on the dynamo export, and (outside this script) on the graph fused by onnxscript's "
            "optimize_for_ort (Attention, SkipLayerNorm, BiasGelu): ORT's quantizer left the fused Attention "
            "fp32 and that graph ran slower than the unfused int8 one here; a 384-wide BERT (where "
            "attention, LayerNorm, GELU and per-call activation quantization weigh more) gave 2.5x / 2.4x. "
            "Per-tensor "
            "backends (eager, ORT) also lose accuracy on the outliers"
        )
    return record(
        BENCH,
        figures,
        note=note,
        layers=layers,
        hidden=hidden,
        seq_len=seq,
        outlier_ratio={"min": min(ratios.values()), "max": max(ratios.values())},
        best={f"b{bs}": r["best"] for bs, r in per_batch.items()},
        cosines={f"b{bs}": r["cosine"] for bs, r in per_batch.items()},
        p50_ms={f"b{bs}": r["p50_ms"] for bs, r in per_batch.items()},
        setup_s=setup_s,
        gap_s=GAP_S,
        artifact_bytes=sizes,
        finite=all(math.isfinite(v) for r in per_batch.values() for v in r["cosine"].values()),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
