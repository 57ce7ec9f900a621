"""``kiln quantize`` through Typer's CliRunner on a small app of its own."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from torchkiln.cli import quantize as quantize_cli
from torchkiln.errors import KilnError
from torchkiln.report.history import History

pytest.importorskip("torchao")

FAST = ["--max-time-s", "0.3", "--batch-size", "8"]

MLP_RECIPE = """
name = "quant_mlp"
[model]
name = "mlp"
args = { hidden = [64, 64] }
[data]
name = "digits"
batch_size = 16
"""

CNN_RECIPE = """
name = "quant_cnn"
[model]
name = "resnet-tiny"
args = { widths = [16, 32], blocks_per_stage = [1, 1] }
[data]
name = "digits"
args = { layout = "image" }
batch_size = 16
"""


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    quantize_cli.register(app)
    return app


def _run(app, args):
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, (SystemExit, KilnError)):
        raise result.exception
    return result


def test_dynamic_eager_on_a_recipe_records_the_table(app, tmp_path):
    recipe = tmp_path / "mlp.toml"
    recipe.write_text(MLP_RECIPE)
    out = tmp_path / "mlp-int8.pt"
    result = _run(app, ["quantize", str(recipe), "--backend", "eager", "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "mlp-int8.pt.json").is_file()
    for text in ("artifact size", "accuracy", "output agreement", "recorded run"):
        assert text in result.output
    run = History().list(kind="compress")[0]
    assert run.name == "quant_mlp" and run.config["method"] == "dynamic" and run.config["backend"] == "eager"
    after = run.results["report"]["after"]
    assert after["artifact_bytes"] == out.stat().st_size
    assert after["accuracy"] is not None and run.results["layers"] == ["body.0.0", "body.1.0"]


def test_static_on_a_cnn_recipe(app, tmp_path):
    recipe = tmp_path / "cnn.toml"
    recipe.write_text(CNN_RECIPE)
    out = tmp_path / "cnn.pt2"
    args = ["quantize", str(recipe), "--method", "static", "--calibration-batches", "2", "-o", str(out)]
    result = _run(app, [*args, "--no-record", *FAST])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "quantize/int8-static" in result.output


def test_onnxruntime_on_a_zoo_model(app, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "gpt.onnx"
    args = ["quantize", "gpt-tiny", "--backend", "onnxruntime", "--exclude", "blocks.0.*", "-o", str(out)]
    result = _run(app, [*args, "--no-record", *FAST])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "ONNX Runtime" in result.output
    assert "12 layers quantized" in result.output  # 4 blocks x 4 Linear, block 0 excluded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["mlp", "--method", "prune"],
            "--method 'prune' is unknown; accepted: dynamic, static, weight-only, qat",
        ),
        (["mlp", "--backend", "tensorrt"], "accepted: torchao, eager, onnxruntime"),
        (["mlp", "--method", "static"], "needs representative data"),
        (["mlp", "--method", "static", "--backend", "eager"], "applies to --method dynamic only"),
        (["no-such-model"], "is not a zoo model"),
        (["mlp", "--bits", "4"], "accepted: 8, or 4 with --method weight-only"),
        (["weights.pt"], "weights.pt: no such file"),
        (["mlp", "--set", "data.batch_size=8"], "--set overrides need a recipe (.toml)"),
        (["mlp", "--include", "encoder.*"], "matches no quantizable layer"),
    ],
)
def test_errors_name_what_was_wrong(app, args, message):
    result = _run(app, ["quantize", *args, "--no-record"])
    assert result.exit_code != 0
    assert message in str(result.exception)


def test_a_bare_weights_file_asks_for_the_model(app, tmp_path):
    import torch

    from torchkiln.zoo import create_model

    weights = tmp_path / "weights.pt"
    torch.save(create_model("mlp").state_dict(), weights)
    result = _run(app, ["quantize", str(weights), "--no-record"])
    assert result.exit_code != 0
    assert "without a recipe.json" in str(result.exception) and "--weights" in str(result.exception)


def test_help_lists_methods_and_backends(app):
    result = CliRunner().invoke(app, ["quantize", "--help"])
    assert result.exit_code == 0
    for word in ("dynamic", "static", "weight-only", "qat", "onnxruntime", "--include", "--exclude"):
        assert word in result.output


def test_weight_only_int4_on_a_zoo_model(app, tmp_path):
    out = tmp_path / "mlp-int4.pt"
    result = _run(
        app,
        ["quantize", "mlp", "--method", "weight-only", "--bits", "4", "-o", str(out), "--no-record", *FAST],
    )
    assert result.exit_code == 0, result.output
    assert "quantize/int4-weight-only" in result.output and out.is_file()
