"""``kiln demo``: the whole story on real bundled data. (1) The built-in models trained with torchkiln's
optimized recipe next to a plain baseline (throughput, accuracy, what changed); (2) ``optimize`` for
inference on the trained resnet-tiny (digits): every candidate measured against fp32 eager, the best
within a 1-point accuracy budget chosen and exported; (3) that artifact served with dynamic batching and
load-tested; (4) one HTML report, and the headline numbers.

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
        "_model": result.model,
        "_data": (train, val),
    }


def run_demo(quick: bool = False, out_dir: str | Path = "runs/demo") -> dict[str, Any]:
    """Run every case baseline vs optimized; print the table; return (and save) the figures."""
    from rich.table import Table

    from torchkiln.cli import make_console

    console = make_console()
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
    resnet = next(runs for case, runs in rows if case.model == "resnet-tiny")["optimized"]
    for case in summary["cases"]:
        for variant in ("baseline", "optimized"):
            case[variant] = {k: v for k, v in case[variant].items() if not k.startswith("_")}
    story = _inference_story(console, resnet["_model"], *resnet["_data"], out, quick)
    summary.update(story)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    console.rule("[bold]headline numbers")
    for case, runs in rows:
        b, o = runs["baseline"], runs["optimized"]
        console.print(
            f"training {case.title}: {o['samples_per_s'] / b['samples_per_s']:.2f}x samples/s "
            "(optimized recipe vs plain baseline)"
        )
    console.print(f"inference resnet-tiny / digits: {story['optimize']['message']}")
    lt = story.get("loadtest")
    if lt:
        console.print(
            f"serving {story['optimize']['artifact_format']} with dynamic batching: "
            f"{lt['throughput_rps']:,.0f} req/s at concurrency {lt['concurrency']}, p50 "
            f"{_pct(lt, 'p50')} ms, p99 {_pct(lt, 'p99')} ms"
        )
    else:
        console.print(f"serving: skipped ({story.get('serve_skipped')})")
    console.print(f"report: {story['report']}")
    console.print(f"figures saved to {out / 'demo.json'}")
    return summary


def _inference_story(
    console: Any, model: torch.nn.Module, train: Any, val: Any, out: Path, quick: bool
) -> dict[str, Any]:
    """optimize the trained resnet-tiny for inference, serve the chosen artifact, load-test it, report."""
    from torchkiln.cli.optimize import candidate_line, candidate_table, print_summary
    from torchkiln.optimize import accuracy_evaluator, optimize
    from torchkiln.report.history import History
    from torchkiln.report.html import render_report

    console.rule("[bold]optimize for inference: resnet-tiny / digits, 1-point accuracy budget, batch 32")
    model = model.cpu().eval()
    history = History()
    opt_dir = out / "optimize"
    if opt_dir.exists():
        shutil.rmtree(opt_dir)
    rows: list[Any] = []
    evaluator = accuracy_evaluator(val.x, val.y, 32)

    def on_result(r: Any) -> None:
        rows.append(r)
        console.print("  " + candidate_line(r, rows, 0.01), highlight=False)

    result = optimize(
        model,
        val.x[:32],
        evaluator,
        accuracy_budget=0.01,
        batch_size=32,
        train_data=train,
        compile=not quick,
        prune_ratios=(0.5,),
        distill_epochs=1 if quick else 4,
        quick=quick,
        history=history,
        out_dir=opt_dir,
        name="resnet-tiny-digits",
        on_result=on_result,
        report=False,
        fresh=True,  # measured afresh every demo (the cache is for interrupted searches)
    )
    console.print(candidate_table(rows, 0.01, title="optimize: candidates against fp32 eager"))
    print_summary(console, result, f"accuracy on {len(val)} digits validation samples")
    story: dict[str, Any] = {"optimize": result.to_results()}
    runs = [history.get(result.run_id)]
    lt = _serve_and_loadtest(console, result, quick)
    if isinstance(lt, str):
        story["serve_skipped"] = lt
    else:
        story["loadtest"] = lt
        runs.append(
            history.get(
                history.record("loadtest", "demo-serve", lt, config={"artifact": str(result.artifact)})
            )
        )
    story["report"] = str(render_report(runs, out / "report.html", title="kiln demo: train, optimize, serve"))
    return story


def _serve_and_loadtest(console: Any, result: Any, quick: bool) -> dict[str, Any] | str:
    """Serve the chosen artifact in-process with dynamic batching and load-test it; the loadtest's figures,
    or why it was skipped."""
    import asyncio

    from torchkiln.serve.app import ServerConfig, create_app
    from torchkiln.serve.loadtest import LoadTestConfig, run_loadtest
    from torchkiln.serve.model import load_served_model
    from torchkiln.serve.server import running_server

    if result.artifact is None or result.artifact_format not in ("onnx", "torchscript", "export", "aoti"):
        return f"the chosen artifact ({result.artifact_format}) is not an exported format kiln serve loads"
    console.rule(
        f"[bold]serve {result.artifact.name} ({result.artifact_format}) with dynamic batching + loadtest"
    )
    served = load_served_model(str(result.artifact))
    app = create_app(
        served, ServerConfig(max_batch_size=32, max_delay_ms=2.0, threads=torch.get_num_threads())
    )
    with running_server(app) as url:
        config = LoadTestConfig(url, concurrency=16, duration_s=2.0 if quick else 8.0, warmup_requests=32)
        lt = asyncio.run(run_loadtest(config)).to_json()
    console.print(
        f"  {lt['ok']}/{lt['requests']} ok, {lt['throughput_rps']:,.0f} req/s, latency p50 "
        f"{_pct(lt, 'p50')} ms, p99 {_pct(lt, 'p99')} ms"
    )
    return lt


def _pct(lt: dict[str, Any], key: str) -> str:
    value = (lt.get("latency_ms") or {}).get(key)
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"
