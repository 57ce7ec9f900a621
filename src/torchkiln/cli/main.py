"""Entry point of ``kiln``. Commands import torch lazily so ``kiln --help`` stays fast."""

from __future__ import annotations

import sys

import typer

from torchkiln import __version__

app = typer.Typer(
    name="kiln",
    help="torchkiln: train faster, run faster, use less memory -- and measure every claim.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"torchkiln {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """torchkiln: train faster, run faster, use less memory -- and measure every claim."""


def _register() -> None:
    from torchkiln.cli import bench as _bench
    from torchkiln.cli import data as _data
    from torchkiln.cli import demo as _demo
    from torchkiln.cli import distill as _distill
    from torchkiln.cli import env as _env
    from torchkiln.cli import export as _export
    from torchkiln.cli import history as _history
    from torchkiln.cli import loadtest as _loadtest
    from torchkiln.cli import optimize as _optimize
    from torchkiln.cli import profile as _profile
    from torchkiln.cli import prune as _prune
    from torchkiln.cli import quantize as _quantize
    from torchkiln.cli import report as _report
    from torchkiln.cli import serve as _serve
    from torchkiln.cli import techniques as _techniques
    from torchkiln.cli import train as _train
    from torchkiln.cli import zoo as _zoo

    for module in (_train, _demo, _data, _bench, _profile, _history, _report, _env, _zoo, _techniques):
        module.register(app)
    _serve.register(app)
    _loadtest.register(app)
    _prune.register(app)
    _quantize.register(app)
    _distill.register(app)
    _export.register(app)
    _optimize.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Run ``kiln``; torchkiln's own errors print as one clear message with exit code 2."""
    from torchkiln.errors import KilnError

    try:
        app(args=argv, standalone_mode=True)
    except KilnError as exc:  # pragma: no cover - exercised through the CLI tests
        from rich.console import Console
        from rich.text import Text

        message = Text("error: ", style="bold red") + Text(str(exc))
        Console(stderr=True, soft_wrap=True).print(message, highlight=False)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
