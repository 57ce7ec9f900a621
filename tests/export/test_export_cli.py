"""``kiln export`` end to end through Typer's CliRunner on a small app of its own."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

import torchkiln as tk
from torchkiln.cli import export as export_cli
from torchkiln.export import load_predictor
from torchkiln.report.history import History


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    export_cli.register(app)
    return app


def test_export_zoo_model_with_weights(app, tmp_path) -> None:
    torch.manual_seed(0)
    model = tk.create_model("resnet-tiny", widths=(8,), blocks_per_stage=(1,)).eval()
    with torch.no_grad():
        model.stem[1].running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "art" / "resnet.pt"
    result = CliRunner().invoke(
        app,
        [
            "export",
            "resnet-tiny",
            "--format",
            "torchscript",
            "-o",
            str(out),
            "--weights",
            str(weights),
            "--arg",
            "widths=[8]",
            "--arg",
            "blocks_per_stage=[1]",
            "--batch-size",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "torchscript vs eager PyTorch" in result.output
    assert "max abs error" in result.output and "MB" in result.output
    assert "folded 3 BatchNorm(s)" in result.output
    assert "recorded run export-" in result.output
    predictor = load_predictor(out)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(predictor(x), model(x).detach(), atol=1e-4, rtol=1e-3)
    run = History().latest("export")
    assert run is not None and run.name == "resnet-tiny-torchscript"
    assert run.results["size_bytes"] == out.stat().st_size
    assert [c["batch_size"] for c in run.results["verification"]] == [3, 3, 1, 1, 6, 6][::2]


def test_export_json_from_a_training_run_dir(app, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = {"model": {"name": "mlp", "args": {"hidden": [16]}}, "data": {"name": "digits"}}
    (run_dir / "recipe.json").write_text(json.dumps(recipe))
    from torchkiln.export import resolve_model

    torch.manual_seed(1)
    trained = tk.create_model("mlp", hidden=(16,), in_features=64, num_classes=10)
    torch.save(trained.state_dict(), run_dir / "model.pt")
    assert torch.equal(resolve_model(run_dir).body[0][0].weight, trained.body[0][0].weight)

    out = tmp_path / "mlp.pt2"
    result = CliRunner().invoke(
        app, ["export", str(run_dir / "model.pt"), "-f", "export", "-o", str(out), "--json", "--no-record"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["run_id"] is None and payload["results"]["format"] == "export"
    assert payload["results"]["max_abs_error"] == 0.0
    x = torch.rand(3, 64)
    torch.testing.assert_close(load_predictor(out)(x), trained(x).detach())
    eager = load_predictor(run_dir)  # the run itself, as an eager predictor
    assert eager.format == "eager" and eager.input_specs[0].shape == (None, 64)
    torch.testing.assert_close(eager(x), trained(x).detach())


def _flat(text: str) -> str:
    """Rich's error box, unwrapped."""
    return " ".join(text.replace("│", " ").split())


def test_cli_errors_name_the_problem(app, tmp_path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["export", "mlp", "-f", "tflite", "-o", str(tmp_path / "m")])
    assert bad.exit_code == 2 and "not a format; accepted: torchscript, export, aoti, onnx" in _flat(
        bad.output
    )
    bad = runner.invoke(app, ["export", "mlp", "-f", "export", "--opset", "17", "-o", str(tmp_path / "m")])
    assert bad.exit_code == 2 and "--opset applies to --format onnx only" in _flat(bad.output)
    bad = runner.invoke(
        app, ["export", "mlp", "-o", str(tmp_path / "m"), "--weights", str(tmp_path / "x.pt")]
    )
    assert isinstance(bad.exception, tk.KilnError) and "weights file" in str(bad.exception)
    plain = tmp_path / "w.pt"
    torch.save({}, plain)
    bad = runner.invoke(app, ["export", str(plain), "-o", str(tmp_path / "m")])
    assert isinstance(bad.exception, tk.KilnError) and "without a recipe.json" in str(bad.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
