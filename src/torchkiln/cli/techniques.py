"""``kiln techniques``: list the registered compression techniques and what each needs here."""

from __future__ import annotations

import typer

__all__ = ["register", "techniques"]


def techniques(
    pattern: str = typer.Argument("*", help="Only techniques matching this glob, e.g. 'quantize/*'."),
) -> None:
    """List every registered technique: its config, its requirements, and whether this machine has them."""
    from rich.console import Console
    from rich.table import Table

    from torchkiln.compress.registry import describe_techniques

    rows = describe_techniques(pattern)
    console = Console()
    if not rows:
        console.print(f"no technique matches {pattern!r}")
        raise typer.Exit(1)
    table = Table(title="techniques", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("config")
    table.add_column("needs")
    table.add_column("here")
    table.add_column("summary")
    for row in rows:
        missing = "; ".join(row["missing"])
        here = f"[red]missing:[/red] {missing}" if missing else "[green]ok[/green]"
        table.add_row(row["name"], row["config"], ", ".join(row["needs"]) or "-", here, row["summary"])
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``kiln techniques`` to ``app``."""
    app.command("techniques")(techniques)
