"""``kiln optimize RECIPE``: search ways to run the recipe's model faster within an accuracy budget, with
a live table of candidates, the chosen artifact, a recipe fragment, a history run and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def _cells(r: Any, base: Any, budget: float) -> tuple[list[str], str]:
    """The table cells of one finished candidate, and its status text (rich markup)."""
    if r.status != "ok":
        from rich.markup import escape

        color = "yellow" if r.status == "skipped" else "red"
        why = r.why if len(r.why) <= 64 else r.why[:61] + "..."
        return ["-"] * 6, f"[{color}]{r.status}[/]: {escape(why)}"
    delta = None if r.accuracy_delta is None else 100 * r.accuracy_delta
    within = r.key == "eager" or (delta is not None and delta >= -100 * budget - 1e-9)
    status = ("[green]ok[/]" if within else "[red]over budget[/]") + (" (cached)" if r.cached else "")

    def ratio(value: float | None, of: float | None) -> str:
        return f" ({value / of:.2f}x)" if value and of else ""

    gain = getattr(r, "throughput_gain", None)
    memory = getattr(r, "memory_bytes", None)
    base_memory = getattr(base, "memory_bytes", None) if base else None
    return [
        f"{r.speedup:.2f}x" if r.speedup is not None else "-",
        f"{gain:.2f}x" if gain is not None else "-",
        f"{100 * r.accuracy:.2f}%" if r.accuracy is not None else "-",
        "-" if delta is None else f"{delta:+.2f} pt",
        _fmt_bytes(r.size_bytes) + ratio(r.size_bytes, base.size_bytes if base else None),
        _fmt_bytes(memory) + ratio(memory, base_memory),
    ], status


COLUMNS = ("candidate", "speedup", "sustained", "accuracy", "Δ acc", "size", "memory", "status")


def candidate_table(rows: list[Any], budget: float, title: str = "kiln optimize") -> Any:
    """A rich table of finished candidates: key, median-call speedup, sustained-rate gain (mean call),
    accuracy and its change, artifact size, memory (resident weights + one call's peak), status / why."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in COLUMNS:
        justify = "left" if col in ("candidate", "status") else "right"
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col == "candidate")
    base = next((r for r in rows if r.key == "eager"), None)
    for r in rows:
        cells, status = _cells(r, base, budget)
        table.add_row(r.key, *cells, status)
    return table


def candidate_line(r: Any, rows: list[Any], budget: float) -> str:
    """One finished candidate as a line of text (rich markup): what a log without a terminal shows as
    each candidate finishes, where a live table cannot redraw."""
    base = next((b for b in rows if b.key == "eager"), None)
    cells, status = _cells(r, base, budget)
    if r.status != "ok":
        return f"[{len(rows)}] {r.key}: {status}"
    named = ", ".join(f"{c} {v}" for c, v in zip(COLUMNS[1:-1], cells, strict=True) if v != "-")
    return f"[{len(rows)}] {r.key}: {named} -- {status}"


def register(app: typer.Typer) -> None:
    @app.command("optimize")
    def optimize_cmd(
        recipe: Path = typer.Argument(
            ...,
            help="A TOML recipe (model + data; trained first unless --weights), a kiln train run "
            "(its directory or model.pt beside recipe.json), or a pruned artifact that carries its recipe.",
            show_default=False,
        ),
        accuracy_budget: str = typer.Option(
            "1%", "--accuracy-budget", "-b", help="Largest accuracy drop accepted: '1%', '0.5pt' or 0.01."
        ),
        objective: str = typer.Option(
            "latency",
            "--objective",
            help="latency (median call at --batch-size) | throughput (sustained rate: mean call, stalls "
            "count) | size (saved artifact) | memory (resident weights + peak of one call).",
        ),
        batch_size: int = typer.Option(32, "--batch-size", help="Batch size every candidate is timed at."),
        time_budget: str | None = typer.Option(
            None, "--time-budget", help="Stop starting candidates after this long: '20m', '90s', '1h'."
        ),
        weights: Path | None = typer.Option(
            None, "--weights", help="Trained weights (model.pt); without them the recipe is trained first."
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Output directory (default runs/<name>-optimize)."
        ),
        set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key (repeatable)."),
        compile_: bool = typer.Option(
            True, "--compile/--no-compile", help="Include torch.compile candidates (10-60 s compile each)."
        ),
        prune: str = typer.Option(
            "0.25,0.5", "--prune", help="Pruning ratios to try, ascending ('' for none)."
        ),
        threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: as is)."),
        quick: bool = typer.Option(False, "--quick", help="Short timing (about 1 s per candidate), for CI."),
        history: bool = typer.Option(
            True,
            "--history/--no-history",
            help="Record the run, and cache finished candidates, in runs/history.sqlite "
            "($TORCHKILN_HISTORY); without it the cache is <out>/optimize-cache.json.",
        ),
        fresh: bool = typer.Option(
            False, "--fresh", help="Forget this model's cached candidates and measure them all again."
        ),
    ) -> None:
        """Measure candidates (bf16, channels_last, compile, TorchScript, ONNX Runtime, int8, pruning)
        against fp32 eager, keep the Pareto front and save the best one within the accuracy budget.

        Finished candidates are cached as they finish: an interrupted search (Ctrl-C, a killed job)
        resumes where it stopped when run again with the same model and settings."""
        import torch
        from rich.live import Live

        from torchkiln.cli import make_console
        from torchkiln.optimize.from_recipe import optimize_recipe, parse_budget, parse_duration
        from torchkiln.report.history import History

        console = make_console()
        budget = parse_budget(accuracy_budget)
        seconds = parse_duration(time_budget)
        if threads is not None:
            torch.set_num_threads(threads)
        ratios = tuple(float(r) for r in prune.split(",") if r.strip())
        rows: list[Any] = []
        console.print(
            f"[bold]kiln optimize[/] {recipe}: budget {100 * budget:g} pt, objective {objective}, batch "
            f"{batch_size}, {torch.get_num_threads()} thread(s)"
        )
        hist = History() if history else None
        run_kwargs = dict(
            overrides=list(set_),
            weights=weights,
            out_dir=out,
            history=hist,
            accuracy_budget=budget,
            objective=objective,
            batch_size=batch_size,
            time_budget_s=seconds,
            compile=compile_,
            prune_ratios=ratios,
            quick=quick,
            fresh=fresh,
        )
        try:
            if console.is_terminal:
                with Live(candidate_table(rows, budget), console=console, refresh_per_second=4) as live:

                    def on_result(r: Any) -> None:
                        rows.append(r)
                        live.update(candidate_table(rows, budget))

                    result, what = optimize_recipe(recipe, on_result=on_result, **run_kwargs)
            else:  # a log or a pipe: one line per candidate as it finishes, the table at the end

                def on_line(r: Any) -> None:
                    rows.append(r)
                    console.print(candidate_line(r, rows, budget), highlight=False)

                result, what = optimize_recipe(recipe, on_result=on_line, **run_kwargs)
                console.print(candidate_table(rows, budget))
        except KeyboardInterrupt:
            where = f"{hist.path}" if hist is not None else "<out>/optimize-cache.json"
            console.print(
                f"\n[yellow]interrupted[/] after {len(rows)} candidate(s); finished ones are cached in "
                f"{where}: run the same command again to resume"
            )
            raise typer.Exit(130) from None
        console.print()
        print_summary(console, result, what)


def print_summary(console: Any, result: Any, what: str) -> None:
    """The closing lines: the front, the choice (or that nothing won), where things were written."""
    console.print(f"evaluator: {what}; baseline accuracy {100 * (result.baseline.accuracy or 0):.2f}%")
    axis = {"latency": "speedup", "throughput": "sustained rate", "size": "size", "memory": "memory"}
    console.print(
        f"Pareto front ({axis.get(result.objective, result.objective)}, accuracy, size): "
        f"{', '.join(result.front) or '-'}"
    )
    if result.stopped_early:
        console.print(f"[yellow]stopped early[/]: {result.stopped_early}")
    console.print(("[bold green]" if result.chosen else "[bold yellow]") + result.message + "[/]")
    long = [c for c in result.candidates if c.status != "ok" and len(c.why) > 64]
    for c in long:
        console.print(f"{c.status} {c.key}: {c.why}", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}")
    if result.artifact:
        console.print(
            f"artifact ({result.artifact_format}): {result.artifact}  (kiln serve {result.artifact})"
        )
    if result.recipe_fragment:
        console.print(f"recipe fragment: {result.recipe_fragment}")
    if result.run_id:
        console.print(f"history run: {result.run_id}")
    if result.report:
        console.print(f"report: {result.report}")
