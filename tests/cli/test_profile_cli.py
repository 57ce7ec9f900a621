"""``kiln profile`` and ``kiln memory`` through a Typer app built here: a zoo model and a recipe, the
files they write, and the runs they record in the history."""

from __future__ import annotations

import gzip
import importlib
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from torchkiln.cli.profile import register
from torchkiln.errors import KilnError
from torchkiln.report import History

RECIPE = """
name = "tiny_mlp"
[model]
name = "mlp"
args = { hidden = [32] }
[data]
name = "digits"
batch_size = 16
"""

GPT_ARGS = ["-m", "n_layer=1", "-m", "n_embd=32", "-m", "n_head=2", "-m", "seq_len=16", "-m", "vocab_size=64"]


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "history.sqlite"
    monkeypatch.setenv("TORCHKILN_HISTORY", str(path))
    # A fixed machine peak, so MFU is computed without timing GEMMs in a test.
    profile_module = importlib.import_module("torchkiln.measure.profile")  # the module, not the function
    monkeypatch.setattr(profile_module, "peak_flops", lambda *a, **k: 1e11)
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    return path


def _invoke(app: typer.Typer, args: list[str]):
    res = CliRunner().invoke(app, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res


def test_profile_a_zoo_model(app, history, tmp_path):
    out = tmp_path / "run"
    res = _invoke(
        app,
        ["profile", "gpt-tiny", *GPT_ARGS, "-b", "2", "--steps", "2", "--threads", "1", "--out", str(out)],
    )
    results = json.loads((out / "profile.json").read_text())
    assert results["model"] == "gpt-tiny" and results["mode"] == "train" and results["batch_size"] == 2
    assert results["steps"] == 2 and results["threads"] == 1
    assert {"aten::mm", "aten::addmm"} & {r["name"] for r in results["top_ops"]}
    assert "blocks.0.attn" in {r["name"] for r in results["modules"]}
    assert results["peak_flops_per_s"] == 1e11 and results["mfu"] == pytest.approx(
        results["achieved_flops_per_s"] / 1e11
    )
    with gzip.open(out / "trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]
    assert "top operators" in res.output and "MFU" in res.output

    (run,) = History(history).list(kind="profile")
    assert run.id in res.output and run.name == "gpt-tiny"
    assert run.results["top_ops"] == results["top_ops"]
    assert run.artifacts["trace"] == str(out / "trace.json.gz") and run.artifacts["run_dir"] == str(out)
    assert run.config["threads"] == 1 and run.config["model_args"]["n_layer"] == 1


def test_profile_a_recipe_in_the_default_run_dir(app, history, recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _invoke(app, ["profile", str(recipe), "--set", "data.batch_size=8", "--steps", "1", "--threads", "1"])
    (run_dir,) = (tmp_path / "runs").glob("profile-tiny_mlp-*")
    results = json.loads((run_dir / "profile.json").read_text())
    assert results["model"] == "mlp" and results["batch_size"] == 8 and results["precision"] == "fp32"
    assert "aten::addmm" in {r["name"] for r in results["top_ops"]}
    assert (run_dir / "trace.json.gz").exists()
    (run,) = History(history).list(kind="profile")
    assert run.name == "tiny_mlp" and run.config["data"] == "digits" and run.config["optimizer"] == "adamw"
    assert run.config["model_args"] == {"hidden": [32], "in_features": 64, "num_classes": 10}


def test_profile_inference_of_a_conv_net(app, history, tmp_path):
    out = tmp_path / "conv"
    args = ["-m", "widths=[8, 16]", "-m", "blocks_per_stage=[1, 1]", "--mode", "inference", "--steps", "1"]
    _invoke(app, ["profile", "resnet-tiny", *args, "--threads", "1", "--out", str(out), "--peak", "none"])
    results = json.loads((out / "profile.json").read_text())
    assert results["mode"] == "inference" and results["mfu"] is None
    assert {"aten::convolution", "aten::mkldnn_convolution", "aten::_convolution"} & {
        r["name"] for r in results["top_ops"]
    }


def test_memory_of_a_recipe(app, history, recipe, tmp_path):
    out = tmp_path / "mem"
    res = _invoke(app, ["memory", str(recipe), "--threads", "1", "--out", str(out)])
    results = json.loads((out / "memory.json").read_text())
    assert [p["phase"] for p in results["phases"]] == ["initial", "forward", "backward", "optimizer"]
    assert results["phases"][1]["delta_bytes"] > 0
    assert results["optimizer"] == "AdamW" and results["batch_size"] == 16
    names = {r["name"] for r in results["activation_bytes_by_module"]}
    assert "body.0.0" in names  # the first Linear of the MLP saved the batch
    assert "memory per phase" in res.output
    (run,) = History(history).list(kind="memory")
    assert run.id in res.output and run.artifacts["run_dir"] == str(out)


def test_errors_are_clear(app, history, tmp_path):
    with pytest.raises(KilnError, match="--set applies to recipes"):
        _invoke(app, ["profile", "mlp", "--set", "train.lr=1", "--out", str(tmp_path / "x")])
    with pytest.raises(KilnError, match="--mode"):
        _invoke(app, ["profile", "mlp", "--mode", "eval", "--out", str(tmp_path / "x")])
    with pytest.raises(KilnError, match="recipe file not found"):
        _invoke(app, ["memory", str(tmp_path / "missing.toml")])
