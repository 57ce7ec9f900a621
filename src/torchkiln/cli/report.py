"""``kiln report RUN...``: one self-contained HTML report of runs from the history; prints its path."""

from __future__ import annotations

from pathlib import Path

import typer


def report_command(
    runs: list[str] = typer.Argument(
        ...,
        metavar="RUN",
        help="Runs to report on: an id, a unique id prefix, or kind:name for the newest such run.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Where to write the HTML file (default: runs/report-<first id>.html)."
    ),
    title: str | None = typer.Option(None, "--title", help="The report's title (default: the run names)."),
) -> None:
    """Write one self-contained HTML report (charts inline, no network needed) and attach it to the runs."""
    from torchkiln.report.html import report_for

    path = report_for(runs, out=out, title=title)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``kiln report`` to ``app``."""
    app.command("report")(report_command)
