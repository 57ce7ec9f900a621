"""``kiln demo``: the built-in models trained with an optimized recipe next to a plain baseline."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        quick: bool = typer.Option(False, "--quick", help="Smaller runs (about a minute), for CI."),
        out: str = typer.Option("runs/demo", "--out", "-o", help="Where the runs are written."),
    ) -> None:
        """Train mlp and resnet-tiny on real digits and gpt-tiny on Python source, baseline vs optimized."""
        from torchkiln.demo import run_demo

        run_demo(quick=quick, out_dir=out)
