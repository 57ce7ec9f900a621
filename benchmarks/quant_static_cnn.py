"""Static int8 (PT2E, X86InductorQuantizer, lowered to oneDNN) against fp32 on resnet-tiny, like with like.

resnet-tiny (3 input channels, widths 32/64/128) is trained briefly (6 epochs) on the bundled digits,
upsampled to 3x32x32 (the 8x8 image repeated over 3 channels, bilinear); the trained weights are cached
in ``.cache/bench-models`` so later runs (and ``--quick``) skip training.
``tk.quantize(model, Int8Static(...))`` calibrates on training batches (histogram observer, conv-BN
folded, stem conv and classifier kept float). Both models are then compiled the same way
(``torch.compile`` with inductor freezing; the int8 one from its converted PT2E graph, which inductor
lowers to oneDNN int8 conv kernels: ``run_like(q, model, mode="compile")``) and timed interleaved at
batch 32 (``interleaved_compare``, median of per-round t_fp32 / t_int8). ``acc_drop_pt``: accuracy on the
digits validation split, fp32 minus int8 (both compiled), in percentage points.

Informational: ``speedup_eager`` (fp32 eager vs the lowered int8 graph run eagerly), artifact sizes.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from typing import Any

from benchmarks._common import figure, log, ratio_spread, record, run_benchmark, use_private_inductor_cache

BENCH = "quant_static_cnn"
THREADS = (1,)
SPEEDUP_TARGET = ">= 2.5"
DROP_TARGET = "<= 1.0"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 6)")


def _images(split: str) -> Any:
    import torch
    import torch.nn.functional as F

    import torchkiln as tk

    ds = tk.create_dataset("digits", split, layout="image")
    x = F.interpolate(ds.x.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear", align_corners=False)
    return torch.utils.data.TensorDataset(x.contiguous(), ds.y)


def _accuracy(fn: Any, data: Any, batch_size: int) -> float:
    import torch

    x, y = data.tensors
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            n = len(xb)
            if n < batch_size:  # pad the last batch: compiled graphs keep one shape
                xb = torch.cat([xb, xb.new_zeros(batch_size - n, *xb.shape[1:])])
            correct += int((fn(xb)[:n].argmax(-1) == y[i : i + n]).sum())
    return correct / len(x)


def _trained_model(epochs: int) -> tuple[Any, str]:
    """resnet-tiny trained on the upsampled digits (AdamW 2e-3, cosine, batch 32, seed 0); the weights are
    cached under ``.cache/bench-models`` (training takes minutes on a busy 2-core machine)."""
    import torch

    import torchkiln as tk
    from benchmarks._common import ROOT

    torch.manual_seed(0)
    model = tk.create_model("resnet-tiny", in_channels=3, widths=(32, 64, 128))
    cache = ROOT / ".cache" / "bench-models" / f"{BENCH}-resnet_tiny-3x32x32-e{epochs}-s0.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return model.eval(), f"cached ({cache.name})"
    log(f"[{BENCH}] training resnet-tiny on digits 3x32x32 for {epochs} epochs (cached afterwards) ...")
    tk.fit(
        model,
        _images("train"),
        epochs=epochs,
        batch_size=32,
        lr=2e-3,
        optimizer="adamw",
        schedule={"name": "cosine", "warmup_steps": 20},
        progress="off",
        flops=False,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(cache)
    return model.eval(), "trained in this run"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    use_private_inductor_cache()
    import torch
    from torch.utils.data import DataLoader

    import torchkiln as tk
    from torchkiln.compress.quantize import Int8Static, quant_info, run_like, save_quantized
    from torchkiln.measure import interleaved_compare

    epochs = args.epochs or 6
    bs = args.batch_size
    train, val = _images("train"), _images("val")
    model, trained = _trained_model(epochs)
    calibration = DataLoader(train, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0))
    log(f"[{BENCH}] PT2E static int8: calibrating on 16 batches, lowering to oneDNN ...")
    q = tk.quantize(model, Int8Static(calibration=calibration, num_batches=16))
    info = quant_info(q)

    x = val.tensors[0][:bs].clone()
    if len(x) < bs:
        x = x.repeat((bs + len(x) - 1) // len(x), 1, 1, 1)[:bs]
    fp32_c, int8_c = run_like(q, copy.deepcopy(model), mode="compile")
    with torch.inference_mode():
        log(f"[{BENCH}] compiling fp32 and int8 (inductor, freezing) ...")
        fp32_c(x), int8_c(x)
        acc_fp32 = _accuracy(fp32_c, val, bs)
        acc_int8 = _accuracy(int8_c, val, bs)
        acc_int8_eager = _accuracy(q, val, bs)
        log(f"[{BENCH}] accuracy fp32 {acc_fp32:.4f}, int8 {acc_int8:.4f}; timing at batch {bs} ...")
        compiled = interleaved_compare(
            {"fp32": lambda: fp32_c(x), "int8": lambda: int8_c(x)},
            baseline="fp32",
            warmup=5,
            min_warmup_s=1.0,
            min_rounds=10 if args.quick else 30,
            max_time_s=8.0 if args.quick else 30.0,
        )
        eager = interleaved_compare(
            {"fp32": lambda: model(x), "int8": lambda: q(x)},
            baseline="fp32",
            warmup=3,
            min_rounds=8 if args.quick else 20,
            max_time_s=5.0 if args.quick else 15.0,
        )
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        fp32_path = os.path.join(tmp, "fp32.pt")
        torch.save(model.state_dict(), fp32_path)
        int8_path = save_quantized(q, os.path.join(tmp, "int8.pt2"))
        fp32_bytes, int8_bytes = os.path.getsize(fp32_path), os.path.getsize(int8_path)

    r, e = compiled.ratios["int8"], eager.ratios["int8"]
    drop = 100.0 * (acc_fp32 - acc_int8)
    t_fp32, t_int8 = compiled.timings["fp32"].p50 * 1e3, compiled.timings["int8"].p50 * 1e3
    figures = [
        figure(
            "speedup",
            r.speedup,
            SPEEDUP_TARGET,
            spread=ratio_spread(r),
            rounds=r.pairs,
            note=f"t_fp32/t_int8, both torch.compile + freezing, batch {bs} 3x32x32 "
            f"(fp32 {t_fp32:.2f} ms, int8 {t_int8:.2f} ms)",
        ),
        figure(
            "acc_drop_pt",
            drop,
            DROP_TARGET,
            note=f"digits val ({len(val)} samples): fp32 {100 * acc_fp32:.2f}%, int8 {100 * acc_int8:.2f}% "
            f"(int8 run eagerly: {100 * acc_int8_eager:.2f}%)",
            unit="pt",
        ),
        figure(
            "speedup_eager",
            e.speedup,
            spread=ratio_spread(e),
            rounds=e.pairs,
            note="fp32 eager vs the lowered int8 graph run eagerly (oneDNN int8 kernels, no compile)",
        ),
        figure(
            "size_ratio",
            int8_bytes / fp32_bytes,
            note=f"int8 .pt2 ({int8_bytes} B, graph included) / fp32 state_dict ({fp32_bytes} B)",
        ),
    ]
    met = r.speedup >= 2.5 and drop <= 1.0
    note = (
        f"static int8 {'meets' if met else 'misses'} the targets: {r.speedup:.2f}x compiled vs compiled, "
        f"{drop:+.2f} pt accuracy; {e.speedup:.2f}x eager vs eager"
    )
    return record(
        BENCH,
        figures,
        note=note,
        batch_size=bs,
        epochs=epochs,
        trained=trained,
        quantized_layers=len(info["layers"]),
        calibration_batches=info["calibration_batches"],
        observer=info["observer"],
        fp32_ms=t_fp32,
        int8_ms=t_int8,
        accuracy={"fp32": acc_fp32, "int8": acc_int8},
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
