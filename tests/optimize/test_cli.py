"""``kiln optimize RECIPE`` end to end on a small MLP recipe (trained briefly first, no compile)."""

from typer.testing import CliRunner

import torchkiln as tk
from torchkiln.cli.main import app
from torchkiln.optimize.from_recipe import parse_budget, parse_duration
from torchkiln.report.history import History

RECIPE = """
name = "mlp_opt"
[model]
name = "mlp"
args = { hidden = [64] }
[data]
name = "digits"
batch_size = 64
[train]
epochs = 2
lr = 3e-3
"""


def test_kiln_optimize_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "mlp.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "opt"
    args = [
        "optimize",
        str(recipe),
        "--no-compile",
        "--prune",
        "",
        "--batch-size",
        "16",
        "--quick",
        "-o",
        str(out),
    ]
    res = CliRunner().invoke(app, args + ["--accuracy-budget", "2%"])
    assert res.exit_code == 0, res.output
    assert "eager" in res.output and "torchscript" in res.output and "report:" in res.output
    assert (out / "report.html").is_file() and (out / "optimized.toml").is_file()
    run = History().latest("optimize", "mlp_opt")
    assert run is not None and run.results["accuracy_budget"] == 0.02
    assert {v["name"] for v in run.results["variants"]} >= {"eager", "torchscript"}
    # the artifact is servable and reproduces the trained model's predictions
    artifact = run.results["artifact"]
    predictor = tk.load_predictor(artifact)
    ds = tk.create_dataset("digits", "val")
    assert predictor(ds.x[:16]).shape == (16, 10)
    # without a terminal each candidate is a line as it finishes (then the table)
    assert "[1] eager: speedup 1.00x" in res.output and "memory" in res.output
    # finished candidates are cached in the history database; a second run measures nothing again
    cached = History().cache_get(f"optimize:{run.results['model_hash']}")
    assert len(cached) >= 3 and not (out / "optimize-cache.json").exists()
    # the training run the first search made is itself a target: its weights and data, no retraining
    run_args = [str(out / "train")] + args[2:]
    again = CliRunner().invoke(app, ["optimize"] + run_args + ["--accuracy-budget", "2%"])
    assert again.exit_code == 0, again.output
    assert "(cached)" in again.output


def test_parse_budget_and_duration_errors():
    assert parse_budget("1%") == 0.01 and parse_duration("2m") == 120.0
    for bad in ("one percent", "150%"):
        try:
            parse_budget(bad)
        except tk.KilnError as exc:
            assert "budget" in str(exc)
        else:
            raise AssertionError(bad)


def test_kiln_optimize_refuses_targets_without_data(tmp_path):
    res = CliRunner().invoke(app, ["optimize", "mlp", "--quick", "-o", str(tmp_path)])
    said = res.output + str(res.exception)
    assert res.exit_code != 0 and "zoo model, which kiln optimize does not take" in said and "recipe" in said
    res = CliRunner().invoke(app, ["optimize", str(tmp_path / "missing.toml"), "-o", str(tmp_path)])
    assert res.exit_code != 0 and "no such file" in res.output + str(res.exception)
