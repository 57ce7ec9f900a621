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
        nproc_per_node: int | None = typer.Option(
            None,
            "--nproc-per-node",
            help="Train on N processes per node with torch.distributed (torchrun, elastic); "
            "train.strategy picks DDP or FSDP2. data.batch_size is per process.",
        ),
        nnodes: int = typer.Option(1, "--nnodes", help="Nodes taking part (with --nproc-per-node)."),
        node_rank: int = typer.Option(0, "--node-rank", help="This node's rank, 0..nnodes-1."),
        master_addr: str | None = typer.Option(
            None, "--master-addr", help="Address of node 0 (several nodes; default: local standalone)."
        ),
        master_port: int | None = typer.Option(
            None, "--master-port", help="Port on node 0 (several nodes; default: a free local port)."
        ),
        max_restarts: int = typer.Option(
            0,
            "--max-restarts",
            help="Restart the worker group up to K times after a failure; a restart resumes from the "
            "newest checkpoint.",
        ),
    ) -> None:
        """Train a model from a recipe: mixed precision, accumulation, schedules, checkpoints, resume.

        Writes metrics.jsonl, TensorBoard events (if installed), checkpoints and model.pt to the run
        directory. Every recipe key is checked before any work starts. With --nproc-per-node N the
        same recipe trains on N processes (DDP or FSDP2); the same happens under your own torchrun.
        """
        from rich.console import Console

        from torchkiln.recipe import load_recipe
        from torchkiln.train import distributed

        console = Console()
        rec = load_recipe(recipe, set_)
        if check:
            console.print(f"[green]ok[/] {recipe}: model={rec.model.name} data={rec.data.name}")
            return
        out_dir = out or (
            Path(rec.train.out_dir) if rec.train.out_dir else Path("runs") / (rec.name or "run")
        )
        env = distributed.launched_env()
        if nproc_per_node is not None:
            if env is not None:
                raise distributed.DistributedError(
                    "--nproc-per-node inside a process torchrun already started: drop the option "
                    "(fit reads RANK/WORLD_SIZE from torchrun)"
                )
            console.print(
                f"[bold]kiln train[/] {recipe} on {nnodes} node(s) x {nproc_per_node} process(es), "
                f"strategy={rec.train.strategy} -> {out_dir}"
            )
            worker = ["train", str(recipe), "--out", str(out_dir)]
            worker += [arg for text in set_ for arg in ("--set", text)]
            worker += ["--history" if history else "--no-history"]
            if resume is not None:
                worker += ["--resume", resume]
            distributed.launch(
                worker,
                nproc_per_node=nproc_per_node,
                nnodes=nnodes,
                node_rank=node_rank,
                master_addr=master_addr,
                master_port=master_port,
                max_restarts=max_restarts,
            )
            return
        from torchkiln.train.from_recipe import train_recipe

        main = distributed.is_main_process()
        if main:
            where = f" (rank 0 of {env['world_size']})" if env and env["world_size"] > 1 else ""
            console.print(
                f"[bold]kiln train[/] {recipe}{where}  model={rec.model.name} data={rec.data.name} "
                f"precision={rec.train.precision} accumulate={rec.train.accumulate} -> {out_dir}"
            )
        result = train_recipe(rec, resume=resume, out_dir=out_dir, record=history)
        if env is not None:  # (after a failure the process just exits: a barrier would wait for the timeout)
            distributed.shutdown()
        if not main:
            return
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
    if getattr(result, "world_size", 1) > 1:
        table.add_row("processes", f"{result.world_size} ({result.strategy})")
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
    table.add_row(
        "throughput",
        f"{result.samples_per_s:,.1f} samples/s"
        + (" (all processes)" if getattr(result, "world_size", 1) > 1 else ""),
    )
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
