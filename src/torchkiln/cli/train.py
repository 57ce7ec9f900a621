"""``kiln train RECIPE``: validate the recipe, build model and data, train, print what it bought."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        recipe: Path = typer.Argument(..., help="TOML recipe file (see recipes/).", show_default=False),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override a recipe key, e.g. --set train.lr=3e-4 (repeatable)."
        ),
        resume: str | None = typer.Option(
            None, "--resume", help="Checkpoint file, run directory, or 'auto' (newest in the run directory)."
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Run directory (default runs/<recipe name>)."
        ),
        check: bool = typer.Option(False, "--check", help="Validate the recipe and exit without training."),
        history: bool = typer.Option(
            True, "--history/--no-history", help="Record the run in runs/history.sqlite."
        ),
    ) -> None:
        """Train a model from a recipe: mixed precision, accumulation, schedules, checkpoints, resume.

        Writes metrics.jsonl, TensorBoard events (if installed), checkpoints and model.pt to the run
        directory. Every recipe key is checked before any work starts.
        """
        from rich.console import Console

        from torchkiln.recipe import load_recipe

        console = Console()
        rec = load_recipe(recipe, set_)
        if check:
            console.print(f"[green]ok[/] {recipe}: model={rec.model.name} data={rec.data.name}")
            return
        from torchkiln.train.from_recipe import train_recipe

        out_dir = out or (
            Path(rec.train.out_dir) if rec.train.out_dir else Path("runs") / (rec.name or "run")
        )
        console.print(
            f"[bold]kiln train[/] {recipe}  model={rec.model.name} data={rec.data.name} "
            f"precision={rec.train.precision} accumulate={rec.train.accumulate} -> {out_dir}"
        )
        result = train_recipe(rec, resume=resume, out_dir=out_dir, record=history)
        print_result(console, result)
        if result.run_id:
            from torchkiln.report import report_for

            report = report_for([result.run_id], out=Path(result.out_dir or out_dir) / "report.html")
            console.print(f"recorded as run [bold]{result.run_id}[/] (kiln history); report: {report}")


def print_result(console, result) -> None:
    from rich.table import Table

    table = Table(title="training summary", show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("optimizer steps", f"{result.steps}")
    if result.skipped_steps:
        table.add_row("fp16 steps skipped (overflow)", f"{result.skipped_steps}")
    if result.nonfinite_losses:
        table.add_row("non-finite losses skipped", f"{result.nonfinite_losses}")
    table.add_row(
        "epochs completed", f"{result.epochs_completed}" + ("  (early stop)" if result.stopped_early else "")
    )
    if result.losses:
        table.add_row("final train loss", f"{result.losses[-1]:.4f}")
    for key, value in result.val_metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("throughput", f"{result.samples_per_s:,.1f} samples/s")
    if result.tokens_per_s:
        table.add_row("tokens/s", f"{result.tokens_per_s:,.0f}")
    if getattr(result, "padding_efficiency", None) is not None:
        efficiency = 100 * result.padding_efficiency
        table.add_row("padding efficiency", f"{efficiency:.1f}% (real / computed tokens)")
    if result.flops_per_step:
        table.add_row("FLOPs per optimizer step", f"{result.flops_per_step:.3e}")
    if result.mfu is not None:
        table.add_row("MFU (vs measured GEMM peak)", f"{100 * result.mfu:.1f}%")
    if result.out_dir:
        table.add_row("run directory", result.out_dir)
    console.print(table)
