"""``kiln zoo`` lists models and datasets (tested through a small Typer app holding only this command)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from torchkiln.cli.zoo import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def _other() -> None:  # a second command so Typer keeps "zoo" as a subcommand
        pass

    return app


def test_zoo_command_lists_everything() -> None:
    result = CliRunner().invoke(_app(), ["zoo"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("gpt-tiny", "GPT", "842,496", "resnet-tiny", "ResNetTiny", "mlp", "MLP"):
        assert text in result.output
    for text in ("digits", "pycode", "synthetic", "train, val, test"):
        assert text in result.output


def test_zoo_command_pattern() -> None:
    result = CliRunner().invoke(_app(), ["zoo", "gpt*"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (
        "gpt-tiny" in result.output and "resnet-tiny" not in result.output and "digits" not in result.output
    )
