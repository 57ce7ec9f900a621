"""``kiln demo``: the built-in models trained with torchkiln's optimized recipe next to a plain baseline,
on real bundled data, and the comparison printed (throughput, accuracy, what changed).

The baseline is what a typical snippet does: fp32, the for-loop Adam, a constant learning rate.
The optimized recipe turns on what measurably helps on this kind of machine: bf16 autocast where the
CPU or GPU has bf16 units (attention kept in fp32 with the flash kernel on CPU), the fused AdamW
kernel, a warm-up + cosine schedule, channels_last for the conv net. Both runs see the same data,
steps and seed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class _Case:
    title: str
    model: str
    model_args: dict[str, Any]
    dataset: str
    data_args: dict[str, Any]
    batch_size: int
    epochs: int
    max_steps: int | None
    lr: float
    extra: dict[str, Any]


def _bf16_ok() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        from torchkiln.measure import cpu_flags

        flags = cpu_flags()
        return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    except Exception:  # noqa: BLE001 - no flag information: stay with fp32
        return False


def _cases(quick: bool) -> list[_Case]:
    gpt_args = (
        {"n_layer": 2, "n_embd": 64, "n_head": 4} if quick else {"n_layer": 4, "n_embd": 128, "n_head": 4}
    )
    return [
        _Case(
            "mlp / digits",
            "mlp",
            {"hidden": [256, 256]},
            "digits",
            {},
            64,
            3 if quick else 15,
            None,
            3e-3,
            {},
        ),
        _Case(
            "resnet-tiny / digits",
            "resnet-tiny",
            {"widths": [16, 32, 64]},
            "digits",
            {"layout": "image"},
            64,
            2 if quick else 8,
            None,
            3e-3,
            {"channels_last": True},
        ),
        _Case(
            "gpt-tiny / pycode",
            "gpt-tiny",
            gpt_args,
            "pycode",
            {"seq_len": 128, "max_bytes": 1_000_000 if quick else 3_000_000},
            16,
            1,
            15 if quick else 120,
            1e-3,
            {"eval_batches": 10 if quick else 40},
        ),
    ]


def _train(case: _Case, optimized: bool, out_dir: Path, bf16: bool) -> dict[str, Any]:
    from torchkiln.train import fit
    from torchkiln.train.from_recipe import infer_model_args
    from torchkiln.zoo import create_dataset, create_model

    train = create_dataset(case.dataset, "train", **case.data_args)
    val = create_dataset(case.dataset, "val", **case.data_args)
    torch.manual_seed(0)
    filled = infer_model_args(case.model, case.model_args, train)
    model = create_model(case.model, **filled, **case.model_args)
    steps_hint = case.max_steps or case.epochs * -(-len(train) // case.batch_size)
    common: dict[str, Any] = {
        "batch_size": case.batch_size,
        "epochs": case.epochs,
        "max_steps": case.max_steps,
        "lr": case.lr,
        "progress": "auto",
        "flops": False,
        "seed": 0,
        "eval_batches": case.extra.get("eval_batches"),
        "out_dir": str(out_dir),
        "tensorboard": False,
    }
    if optimized:
        settings = {
            "precision": "bf16" if bf16 else "fp32",
            "optimizer": {"name": "adamw", "implementation": "auto"},
            "schedule": {"name": "cosine", "warmup_steps": max(1, steps_hint // 20), "eta_min": case.lr / 20},
            "channels_last": bool(case.extra.get("channels_last")),
        }
    else:
        settings = {
            "precision": "fp32",
            "optimizer": {"name": "adam", "implementation": "for-loop"},
            "schedule": {"name": "constant"},
        }
    start = time.perf_counter()
    result = fit(model, train, val, **common, **settings)
    wall = time.perf_counter() - start
    return {
        "steps": result.steps,
        "samples_per_s": result.samples_per_s,
        "tokens_per_s": result.tokens_per_s,
        "wall_s": wall,
        "val": result.val_metrics,
        "settings": settings,
    }


def run_demo(quick: bool = False, out_dir: str | Path = "runs/demo") -> dict[str, Any]:
    """Run every case baseline vs optimized; print the table; return (and save) the figures."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    out = Path(out_dir)
    bf16 = _bf16_ok()
    threads = torch.get_num_threads()
    console.print(
        f"[bold]kiln demo[/] -- torch {torch.__version__}, {threads} threads, "
        f"bf16 units: {'yes' if bf16 else 'no (optimized recipe stays fp32)'}"
    )
    rows = []
    for i, case in enumerate(_cases(quick)):
        console.rule(f"[bold]{case.title}")
        runs = {}
        for variant in ("baseline", "optimized"):
            console.print(f"  training {variant} ...")
            run_dir = out / f"{i}-{case.model}-{variant}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # the demo's own run directory from an earlier demo
            runs[variant] = _train(case, variant == "optimized", run_dir, bf16)
        rows.append((case, runs))

    table = Table(title="baseline vs optimized (same data, steps and seed; one run each on this machine)")
    for col in ("model / data", "variant", "steps", "samples/s", "speed-up", "val accuracy", "val loss"):
        table.add_column(col, justify="left" if col in ("model / data", "variant") else "right")
    summary: dict[str, Any] = {"torch": torch.__version__, "threads": threads, "bf16": bf16, "cases": []}
    for case, runs in rows:
        base = runs["baseline"]
        for variant, r in runs.items():
            speedup = r["samples_per_s"] / base["samples_per_s"] if base["samples_per_s"] else float("nan")
            acc = r["val"].get("val_accuracy")
            table.add_row(
                case.title if variant == "baseline" else "",
                variant,
                str(r["steps"]),
                f"{r['samples_per_s']:,.0f}",
                f"{speedup:.2f}x",
                f"{acc:.3f}" if acc is not None else "-",
                f"{r['val']['val_loss']:.3f}",
            )
        summary["cases"].append({"title": case.title, **{k: v for k, v in runs.items()}})
    console.print(table)
    console.print(
        "optimized = "
        + ", ".join(f"{k}={v}" for k, v in rows[0][1]["optimized"]["settings"].items())
        + "\nInterleaved, repeated measurements of each technique: benchmarks/RESULTS.md"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    console.print(f"figures saved to {out / 'demo.json'}")
    return summary
