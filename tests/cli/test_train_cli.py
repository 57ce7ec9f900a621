"""``kiln train``: runs a recipe end to end, resumes, and reports bad recipes as one clear error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from torchkiln.cli.main import app

RECIPE = """
name = "cli_mlp"
[model]
name = "mlp"
args = { hidden = [32] }
[data]
name = "digits"
batch_size = 64
[train]
epochs = 2
lr = 3e-3
precision = "bf16"
checkpoint_every = 5
flops = false
"""


def test_kiln_train_runs_and_writes_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHKILN_HISTORY", str(tmp_path / "history.sqlite"))
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out), "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "training summary" in res.output and "val_accuracy" in res.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "summary" and lines[-1]["steps"] == 20
    assert (out / "model.pt").exists() and (out / "recipe.json").exists()
    from torchkiln.report import History

    (run,) = History().list(kind="train")
    assert run.name == "cli_mlp" and run.id in res.output
    assert run.results["summary"]["steps"] == 20 and len(run.results["curve"]) == 20
    assert run.results["val"][0]["val_accuracy"] > 0 and run.artifacts["run_dir"] == str(out)
    report = out / "report.html"
    assert report.exists() and "<svg" in report.read_text()
    assert History().get(run.id).artifacts["report"] == str(report.resolve())

    # --resume auto continues from the newest checkpoint to the longer schedule
    res = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out), "--resume", "auto"])
    assert res.exit_code == 0, res.output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["steps"] == 40


def test_bad_recipe_is_one_clear_error_exit_2(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(RECIPE.replace("lr = 3e-3", "lr = -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "torchkiln.cli.main", "train", str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"invalid recipe {recipe}" in proc.stderr and "train.lr: got -1" in proc.stderr


def test_check_only(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    res = CliRunner().invoke(app, ["train", str(recipe), "--check"])
    assert res.exit_code == 0 and "ok" in res.output


def test_help_is_fast_and_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "torchkiln.cli.main", "--help"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    for cmd in ("train", "demo", "env", "zoo"):
        assert cmd in proc.stdout
    assert " torch\n" not in proc.stderr.replace("|", "\n").replace(" ", " ")  # torch is not imported


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))
)
def test_shipped_recipes_check(name):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / name
    res = CliRunner().invoke(app, ["train", str(recipe), "--check"])
    assert res.exit_code == 0, res.output
