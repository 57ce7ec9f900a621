"""``kiln optimize RECIPE``: search ways to run the recipe's model faster within an accuracy budget, with
a live table of candidates, the chosen artifact, a recipe fragment, a history run and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def candidate_table(rows: list[Any], budget: float, title: str = "kiln optimize") -> Any:
    """A rich table of finished candidates (key, speedup, accuracy delta, size, status / why)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col, justify in (
        ("candidate", "left"),
        ("speedup", "right"),
        ("accuracy", "right"),
        ("Δ acc", "right"),
        ("size", "right"),
        ("status", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col == "candidate")
    base = next((r for r in rows if r.key == "eager"), None)
    for r in rows:
        if r.status == "ok":
            delta = None if r.accuracy_delta is None else 100 * r.accuracy_delta
            ratio = r.size_bytes / base.size_bytes if base and base.size_bytes and r.size_bytes else None
            within = r.key == "eager" or (delta is not None and delta >= -100 * budget - 1e-9)
            status = ("[green]ok[/]" if within else "[red]over budget[/]") + (" (cached)" if r.cached else "")
            table.add_row(
                r.key,
                f"{r.speedup:.2f}x" if r.speedup is not None else "-",
                f"{100 * r.accuracy:.2f}%" if r.accuracy is not None else "-",
                "-" if delta is None else f"{delta:+.2f} pt",
                f"{r.size_bytes / 1e3:,.0f} kB" + (f" ({ratio:.2f}x)" if ratio else "")
                if r.size_bytes
                else "-",
                status,
            )
        else:
            color = "yellow" if r.status == "skipped" else "red"
            why = r.why if len(r.why) <= 64 else r.why[:61] + "..."
            table.add_row(r.key, "-", "-", "-", "-", f"[{color}]{r.status}[/]: {escape(why)}")
    return table


def register(app: typer.Typer) -> None:
    @app.command("optimize")
    def optimize_cmd(
        recipe: Path = typer.Argument(..., help="TOML recipe (model + data).", show_default=False),
        accuracy_budget: str = typer.Option(
            "1%", "--accuracy-budget", "-b", help="Largest accuracy drop accepted: '1%', '0.5pt' or 0.01."
        ),
        objective: str = typer.Option("latency", "--objective", help="latency | throughput | size."),
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
            True, "--history/--no-history", help="Record the run in runs/history.sqlite."
        ),
    ) -> None:
        """Measure candidates (bf16, channels_last, compile, TorchScript, ONNX Runtime, int8, pruning)
        against fp32 eager, keep the Pareto front and save the best one within the accuracy budget."""
        import torch
        from rich.console import Console
        from rich.live import Live

        from torchkiln.optimize.from_recipe import optimize_recipe, parse_budget, parse_duration
        from torchkiln.report.history import History

        console = Console()
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
        with Live(candidate_table(rows, budget), console=console, refresh_per_second=4) as live:

            def on_result(r: Any) -> None:
                rows.append(r)
                live.update(candidate_table(rows, budget))

            result, what = optimize_recipe(
                recipe,
                overrides=list(set_),
                weights=weights,
                out_dir=out,
                history=History() if history else None,
                accuracy_budget=budget,
                objective=objective,
                batch_size=batch_size,
                time_budget_s=seconds,
                compile=compile_,
                prune_ratios=ratios,
                on_result=on_result,
                quick=quick,
            )
        console.print()
        print_summary(console, result, what)


def print_summary(console: Any, result: Any, what: str) -> None:
    """The closing lines: the front, the choice (or that nothing won), where things were written."""
    console.print(f"evaluator: {what}; baseline accuracy {100 * (result.baseline.accuracy or 0):.2f}%")
    console.print(f"Pareto front (speedup, accuracy, size): {', '.join(result.front) or '-'}")
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
