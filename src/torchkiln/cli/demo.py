"""``kiln demo``: train (optimized vs plain), optimize for inference, serve + loadtest, report."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        quick: bool = typer.Option(
            False, "--quick", help="Smaller runs, no compile candidates (well under 2 minutes), for CI."
        ),
        out: str = typer.Option("runs/demo", "--out", "-o", help="Where the runs are written."),
    ) -> None:
        """The whole story on bundled data: mlp/resnet-tiny (digits) and gpt-tiny (Python source) trained
        baseline vs optimized; optimize for inference on the trained resnet-tiny within 1 point of
        accuracy; the chosen artifact served with dynamic batching and load-tested; one HTML report."""
        from torchkiln.demo import run_demo

        run_demo(quick=quick, out_dir=out)
