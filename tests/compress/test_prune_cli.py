"""``kiln prune`` and ``kiln distill`` end to end on a tiny recipe: artifacts, tables, history, errors."""

from __future__ import annotations

import pytest
import torch
import typer
from typer.testing import CliRunner

from torchkiln.cli import distill as distill_cli
from torchkiln.cli import prune as prune_cli
from torchkiln.compress.prune import load_pruned
from torchkiln.errors import KilnError
from torchkiln.report.history import History

RECIPE = """
name = "prune_mlp"
[model]
name = "mlp"
args = { hidden = [64, 32] }
[data]
name = "digits"
batch_size = 64
[train]
epochs = 1
lr = 3e-3
"""

FAST = ["--max-time-s", "0.3", "--batch-size", "8"]


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    prune_cli.register(app)
    distill_cli.register(app)
    return app


def test_prune_then_distill_from_a_recipe(app: typer.Typer, tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    runner = CliRunner()
    out = tmp_path / "pruned.pt"
    result = runner.invoke(app, ["prune", str(recipe), "--ratio", "0.5", "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "accuracy" in result.output and out.is_file()
    pruned = load_pruned(out)
    assert pruned.body[0][0].out_features == 32 and pruned.head.out_features == 10

    sparse = tmp_path / "sparse.pt"
    result = runner.invoke(
        app, ["prune", str(out), "--method", "magnitude", "--sparsity", "0.8", "-o", str(sparse)]
    )
    assert result.exit_code == 0, result.output
    assert "sparse (CSR) file" in result.output and sparse.is_file()

    teacher = tmp_path / "teacher.pt"
    from torchkiln.zoo import create_model

    torch.save(create_model("mlp", hidden=(64, 32)).state_dict(), teacher)
    student_out = tmp_path / "student.pt"
    result = runner.invoke(
        app,
        [
            "distill",
            str(recipe),
            "--teacher",
            str(teacher),
            "--student",
            str(out),
            "-o",
            str(student_out),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "student artifact" in result.output
    assert load_pruned(student_out).body[0][0].out_features == 32
    runs = History().list(kind="compress")
    assert len(runs) >= 3 and {"before", "after"} <= {v["name"] for v in runs[0].results["variants"]}


def test_errors_name_what_is_accepted(app: typer.Typer, tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["prune", "not-a-model"])
    assert isinstance(result.exception, KilnError) and "zoo models" in str(result.exception)
    result = runner.invoke(app, ["prune", "mlp", "--method", "lottery"])
    assert isinstance(result.exception, KilnError) and "accepted: channels, magnitude" in str(
        result.exception
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    result = runner.invoke(
        app, ["distill", str(recipe), "--teacher", str(tmp_path / "nope.pt"), "--student", "mlp"]
    )
    assert isinstance(result.exception, KilnError) and "no such file" in str(result.exception)
