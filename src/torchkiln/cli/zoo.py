"""``kiln zoo``: list the built-in models and datasets."""

from __future__ import annotations

import typer

__all__ = ["register", "zoo"]


def zoo(
    pattern: str = typer.Argument("*", help="Only models and datasets whose name matches this glob."),
) -> None:
    """List the built-in models (class, parameters at defaults) and datasets (splits)."""
    from rich.console import Console
    from rich.table import Table

    from torchkiln.zoo import dataset_entry, list_datasets, list_models, model_entry

    console = Console()
    models = Table(title="models", title_justify="left")
    models.add_column("name", style="bold")
    models.add_column("class")
    models.add_column("params", justify="right")
    models.add_column("description")
    for name in list_models(pattern):
        entry = model_entry(name)
        try:
            model = entry.factory()
            cls = type(model).__name__
            params = f"{sum(p.numel() for p in model.parameters()):,}"
        except Exception as exc:  # a user-registered factory without defaults: still list it
            cls, params = "?", f"({type(exc).__name__})"
        models.add_row(name, cls, params, entry.description)
    console.print(models)

    datasets = Table(title="datasets", title_justify="left")
    datasets.add_column("name", style="bold")
    datasets.add_column("splits")
    datasets.add_column("description")
    for name in list_datasets(pattern):
        entry = dataset_entry(name)
        datasets.add_row(name, ", ".join(entry.splits), entry.description)
    console.print(datasets)
    console.print(
        "User code works wherever a name does: 'package.module:function' or 'path/to/file.py:function'.",
        style="dim",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln zoo`` to ``app``."""
    app.command("zoo")(zoo)
