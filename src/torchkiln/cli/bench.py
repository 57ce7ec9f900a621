"""``kiln bench NAME_OR_RECIPE``: inference latency, variants compared interleaved, throughput sweep,
recorded in the run history and optionally checked against an earlier run for regressions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

__all__ = ["EXIT_REGRESSION", "bench_inputs_from_recipe", "parse_fraction", "print_bench_table", "register"]

EXIT_REGRESSION = 3


def parse_fraction(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05.

    >>> parse_fraction("5%"), parse_fraction("0.05"), parse_fraction("12.5 %")
    (0.05, 0.05, 0.125)
    """
    raw = text.strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1].strip()) / 100.0
        else:
            value = float(raw)
            if value >= 1:
                raise typer.BadParameter(
                    f"{text!r} is ambiguous: write a percentage with '%' (e.g. 5%) or a fraction below 1 "
                    "(e.g. 0.05)",
                    param_hint="--fail-on-regression",
                )
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a threshold; accepted: a percentage such as 5% or a fraction such as 0.05",
            param_hint="--fail-on-regression",
        ) from None
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(
            f"{text!r} must be a non-negative threshold", param_hint="--fail-on-regression"
        )
    return round(value, 12)


def _is_recipe(target: str) -> bool:
    return target.endswith(".toml")


def bench_inputs_from_recipe(train_data: Any, batch_size: int) -> Any:
    """Model inputs from a real batch: ``batch_size`` items of the dataset (cycling if it is smaller),
    collated, with the target dropped (the last element of a tuple, a target key of a dict)."""
    from torchkiln.errors import KilnError
    from torchkiln.targets import data_inputs

    if len(train_data) == 0:
        raise KilnError("the recipe's train split is empty: no batch to benchmark with")
    return data_inputs(train_data, batch_size)


def _build(target: str, overrides: list[str]) -> tuple[Any, Any, int | None, str, str]:
    """``(model, input_fn, default batch size, run name, model name)`` for a zoo name or recipe."""
    from torchkiln.errors import KilnError

    if _is_recipe(target):
        from torchkiln.recipe import load_recipe
        from torchkiln.train.from_recipe import build_from_recipe

        if not Path(target).is_file():
            raise KilnError(f"recipe {target} does not exist")
        rec = load_recipe(target, overrides)
        model, train_data, _, _ = build_from_recipe(rec)
        return (
            model,
            lambda bs: bench_inputs_from_recipe(train_data, bs),
            rec.data.batch_size,
            rec.name or Path(target).stem,
            rec.model.name,
        )
    if overrides:
        raise KilnError("--set overrides apply to recipes only; give a .toml recipe or drop --set")
    from torchkiln.zoo import create_model

    model = create_model(target)
    example = getattr(model, "example_inputs", None)
    if not callable(example):
        raise KilnError(
            f"model {target!r} has no example_inputs(batch_size) method, so kiln bench cannot make inputs "
            "for it; add one, or benchmark it through a recipe (inputs then come from the recipe's data)"
        )
    return model, example, None, target, target


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def print_bench_table(console: Any, results: dict[str, Any], title: str | None = None) -> None:
    """The variants of a bench results dict as a rich table; the winner's row is highlighted."""
    from rich.table import Table

    variants = results.get("variants") or []
    baseline = results.get("baseline")
    winner = results.get("winner") if len(variants) > 1 else None
    caption = (
        f"batch {results.get('batch_size')}, {results.get('threads')} thread(s), {results.get('device')}; "
        f"speedup = median (± IQR) of per-round t({baseline}) / t(variant), interleaved in one process"
        + (f"; * winner: {winner}" if winner else "")
    )
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col, justify in (
        ("variant", "left"),
        ("p50 ms", "right"),
        ("p90 ms", "right"),
        ("p99 ms", "right"),
        ("IQR ms", "right"),
        ("rounds", "right"),
        ("samples/s", "right"),
        (f"speedup vs {baseline}", "right"),
    ):
        table.add_column(col, justify=justify)
    for v in variants:
        lat = v.get("latency_ms") or {}
        speedup = v.get("speedup_vs_baseline")
        iqr = v.get("speedup_iqr")
        speed_text = "-" if speedup is None else f"{speedup:.2f}x" + (f" ±{iqr:.2f}" if iqr else "")
        is_winner = v.get("name") == winner
        name = f"{v.get('name')} *" if is_winner else str(v.get("name"))
        rounds = str(v.get("rounds", "-")) + ("~" if v.get("converged") is False else "")
        rate = v.get("throughput_per_s")
        table.add_row(
            name,
            _fmt_ms(lat.get("p50")),
            _fmt_ms(lat.get("p90")),
            _fmt_ms(lat.get("p99")),
            _fmt_ms(lat.get("iqr")),
            rounds,
            "-" if rate is None else f"{rate:,.0f}",
            speed_text,
            style="bold green" if is_winner else None,
        )
    console.print(table)
    if any(v.get("converged") is False for v in variants):
        console.print(
            "~ not converged: the spread stayed above the target IQR/median "
            f"({results.get('target_iqr', 0.05):.0%}) within the time budget (a noisy machine); the "
            "percentiles still use every timed call",
            style="dim",
            highlight=False,
        )


def _print_sweep(console: Any, results: dict[str, Any]) -> None:
    from rich.table import Table

    points = results.get("sweep") or []
    if not points and not results.get("sweep_stopped"):
        return
    table = Table(title="throughput vs batch size", title_justify="left")
    for col in ("variant", "batch", "p50 ms", "samples/s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for p in points:
        style = None if p.get("within_ceiling", True) else "dim"
        table.add_row(
            p["variant"],
            str(p["batch_size"]),
            _fmt_ms(p.get("latency_p50_ms")),
            f"{p['throughput_per_s']:,.0f}",
            style=style,
        )
    console.print(table)
    console.print(f"sweep stopped: {results.get('sweep_stopped')}", highlight=False)


def _check_baseline_run(run: Any, batch_size: int, variants: list[str]) -> None:
    from torchkiln.errors import KilnError
    from torchkiln.report.history import bench_variants

    if run.kind != "bench":
        raise KilnError(
            f"--baseline {run.id} is a {run.kind!r} run; give a bench run (`kiln history --kind bench`)"
        )
    base_bs = run.results.get("batch_size")
    known = list(bench_variants(run.results))
    if base_bs is not None and base_bs != batch_size:
        raise KilnError(
            f"--baseline {run.id} was measured at batch size {base_bs} and this run uses {batch_size}; "
            f"compare like with like: rerun with --batch-size {base_bs}"
        )
    if not set(known) & set(variants):
        raise KilnError(
            f"--baseline {run.id} has no variant in common with this run: it has "
            f"{', '.join(known) or 'none'}, this run measures {', '.join(variants)}"
        )


def register(app: typer.Typer) -> None:
    """Add ``kiln bench`` to ``app``."""

    @app.command("bench")
    def bench_command(
        target: str = typer.Argument(
            ...,
            help="A zoo model name (see `kiln zoo`) or a recipe .toml (inputs: a real batch of its data).",
            show_default=False,
        ),
        variant: list[str] = typer.Option(
            [],
            "--variant",
            "-V",
            help="Inference variant (repeatable; the first is the baseline): fp32, bf16, fp16, "
            "channels_last, compile, compile-max-autotune; combine with '+', e.g. channels_last+bf16. "
            "Default: fp32.",
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", "-b", min=1, help="Batch size (default: the recipe's, or 32)."
        ),
        threads: int | None = typer.Option(
            None, "--threads", "-t", min=1, help="torch.set_num_threads for the run (default 1 on CPU)."
        ),
        device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
        sweep: bool = typer.Option(False, "--sweep", help="Also measure throughput at batch 1, 2, 4, ..."),
        max_batch_size: int = typer.Option(
            1024, "--max-batch-size", min=1, help="Largest batch of the sweep."
        ),
        latency_ceiling_ms: float | None = typer.Option(
            None,
            "--latency-ceiling-ms",
            min=0.0,
            help="Stop the sweep at the first batch whose p50 exceeds this.",
        ),
        baseline: str | None = typer.Option(
            None, "--baseline", help="Compare with an earlier bench run: an id, id prefix or kind:name."
        ),
        fail_on_regression: str | None = typer.Option(
            None,
            "--fail-on-regression",
            help="With --baseline: exit 3 if any variant's p50 got slower by more than this (5% or 0.05).",
        ),
        name: str | None = typer.Option(
            None, "--name", help="Name of the recorded run (default: model/recipe)."
        ),
        max_time_s: float = typer.Option(
            10.0, "--max-time-s", min=0.01, help="Time budget of the timed rounds."
        ),
        target_iqr: float = typer.Option(
            0.05, "--target-iqr", min=0.0, help="Stop repeating once IQR/median is under this."
        ),
        warmup: int = typer.Option(5, "--warmup", min=0, help="Warm-up rounds (after one first call)."),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Recipe override, e.g. --set model.args.hidden=[64]."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of tables."),
        record: bool = typer.Option(True, "--record/--no-record", help="Record the run in the history."),
    ) -> None:
        """Benchmark inference: latency percentiles, variants compared interleaved, throughput sweep.

        Threads are fixed (1 by default on CPU) and recorded; every call is timed after warm-up until the
        spread is under --target-iqr or --max-time-s is spent. The run is recorded in the history
        ($TORCHKILN_HISTORY or runs/history.sqlite) and its id printed.
        """
        import torch
        from rich.console import Console

        from torchkiln.errors import KilnError
        from torchkiln.measure.bench import bench
        from torchkiln.measure.variants import get_variant
        from torchkiln.report.history import History, compare_bench_results

        console = Console()
        variants = list(variant) or ["fp32"]
        for v in variants:
            get_variant(v)  # unknown names fail before anything is built
        threshold = parse_fraction(fail_on_regression) if fail_on_regression is not None else None
        if threshold is not None and baseline is None:
            raise typer.BadParameter(
                "needs --baseline RUN to compare with", param_hint="--fail-on-regression"
            )
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise KilnError(f"--device {dev}: CUDA is not available on this machine")

        model, input_fn, default_bs, run_name, model_name = _build(target, list(set_))
        bs = batch_size or default_bs or 32
        history = History() if (record or baseline) else None
        base_run = None
        if baseline is not None:
            base_run = history.get(baseline)
            _check_baseline_run(base_run, bs, [get_variant(v).name for v in variants])

        model = model.to(dev)
        if not json_out:
            console.print(
                f"[bold]kiln bench[/] {target}: variants {', '.join(variants)}, batch {bs}, device {dev}",
                highlight=False,
            )
        result = bench(
            model,
            input_fn,
            variants=variants,
            batch_size=bs,
            threads=threads,
            device=dev,
            warmup=warmup,
            target_iqr=target_iqr,
            max_time_s=max_time_s,
            sweep=sweep,
            max_batch_size=max_batch_size,
            latency_ceiling_ms=latency_ceiling_ms,
            name=model_name,
        )
        results = result.to_results()

        comparison = regressions = None
        if base_run is not None:
            comparison = compare_bench_results(base_run.results, results)
            comparison["baseline_run"] = base_run.id
            if not comparison["rows"]:
                raise KilnError(
                    f"--baseline {base_run.id}: no variant with a p50 to compare "
                    f"(baseline has {', '.join(comparison['only_base']) or 'none'})"
                )
            if threshold is not None:
                comparison["threshold"] = threshold
                regressions = [r for r in comparison["rows"] if r["change"] > threshold]
                comparison["regressions"] = [r["variant"] for r in regressions]
            results["comparison"] = comparison

        run_id = None
        if record:
            config = {
                "target": target,
                "recipe": target if _is_recipe(target) else None,
                "set": list(set_),
                "variants": variants,
                "batch_size": bs,
                "threads": result.threads,
                "device": dev,
                "sweep": sweep,
                "max_batch_size": max_batch_size,
                "latency_ceiling_ms": latency_ceiling_ms,
                "baseline": base_run.id if base_run else None,
                "fail_on_regression": threshold,
                "max_time_s": max_time_s,
                "target_iqr": target_iqr,
                "warmup": warmup,
            }
            run_id = history.record(
                "bench", name or run_name, results, config=config, parent=config["baseline"]
            )

        if json_out:
            typer.echo(json.dumps({"run_id": run_id, "results": results}, default=str))
        else:
            print_bench_table(console, results, title=f"{model_name} inference latency")
            _print_sweep(console, results)
            if run_id:
                console.print(f"recorded run [bold]{run_id}[/] in {history.path}", highlight=False)
            if comparison is not None:
                _print_comparison(console, comparison, threshold)
        if regressions:
            lines = [
                f"  {r['variant']}: p50 {r['new_p50_ms']:.4g} ms vs {r['base_p50_ms']:.4g} ms in "
                f"{base_run.id} ({100 * r['change']:+.1f}%)"
                for r in regressions
            ]
            typer.echo(
                f"REGRESSION: {len(regressions)} variant(s) slower than {base_run.id} by more than "
                f"{100 * threshold:g}%:\n" + "\n".join(lines)
            )
            raise typer.Exit(code=EXIT_REGRESSION)


def _print_comparison(console: Any, comparison: dict[str, Any], threshold: float | None) -> None:
    from rich.table import Table

    table = Table(title=f"p50 vs baseline run {comparison['baseline_run']}", title_justify="left")
    for col in ("variant", "baseline p50 ms", "now p50 ms", "change", "status"):
        table.add_column(col, justify="left" if col in ("variant", "status") else "right")
    for r in comparison["rows"]:
        regressed = threshold is not None and r["change"] > threshold
        status = "REGRESSION" if regressed else ("faster" if r["change"] < 0 else "ok")
        table.add_row(
            r["variant"],
            _fmt_ms(r["base_p50_ms"]),
            _fmt_ms(r["new_p50_ms"]),
            f"{100 * r['change']:+.1f}%",
            status,
            style="bold red" if regressed else None,
        )
    console.print(table)
    for warning in comparison.get("warnings", []):
        console.print(f"note: {warning}", style="yellow", highlight=False)
    if comparison.get("only_base"):
        console.print(f"not measured now: {', '.join(comparison['only_base'])}", style="dim", highlight=False)
    console.print(
        "across-run comparison (separate processes, not interleaved): on a shared machine differences of "
        "~10% can be noise",
        style="dim",
        highlight=False,
    )
    if threshold is not None and not comparison.get("regressions"):
        console.print(f"no variant slower than the baseline by more than {100 * threshold:g}%", style="green")
