"""``kiln bench`` and ``kiln history`` through Typer's CliRunner on a small app of their own."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from torchkiln.cli import bench as bench_cli
from torchkiln.cli import history as history_cli
from torchkiln.errors import KilnError
from torchkiln.measure.variants import VariantError
from torchkiln.report.history import History

FAST = ["--max-time-s", "0.3", "--warmup", "2"]

RECIPE = """
name = "bench_mlp"
[model]
name = "mlp"
args = { hidden = [32] }
[data]
name = "digits"
batch_size = 16
"""


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    bench_cli.register(app)
    history_cli.register(app)
    return app


@pytest.fixture(autouse=True)
def history_path(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite"
    monkeypatch.setenv("TORCHKILN_HISTORY", str(path))
    return path


def run(app, *args: str):
    return CliRunner().invoke(app, list(args))


def _run_id(output: str) -> str:
    line = next(x for x in output.splitlines() if x.startswith("recorded run "))
    return line.split()[2]


def _fake_bench(p50_ms: float, batch_size: int = 8, variants=("fp32",)) -> str:
    results = {
        "model": "mlp",
        "batch_size": batch_size,
        "threads": 1,
        "device": "cpu",
        "baseline": variants[0],
        "variants": [{"name": v, "latency_ms": {"p50": p50_ms}, "rounds": 10} for v in variants],
    }
    return History().record("bench", "fake", results, env={})


def test_bench_records_a_run_and_history_lists_it(app, history_path):
    res = run(app, "bench", "mlp", "--batch-size", "8", "--variant", "fp32", *FAST)
    assert res.exit_code == 0, res.output
    assert "mlp inference latency" in res.output and "p50 ms" in res.output
    run_id = _run_id(res.output)
    recorded = History(history_path).get(run_id)
    assert recorded.kind == "bench" and recorded.name == "mlp"
    assert recorded.results["batch_size"] == 8 and recorded.results["threads"] == 1
    assert [v["name"] for v in recorded.results["variants"]] == ["fp32"]
    assert recorded.config["variants"] == ["fp32"] and recorded.config["batch_size"] == 8
    assert recorded.env["torch"]["version"] == torch.__version__

    listed = run(app, "history")
    assert listed.exit_code == 0, listed.output
    assert run_id in listed.output and "fp32 p50" in listed.output
    as_json = json.loads(run(app, "history", "--kind", "bench", "--json").stdout)
    assert [r["id"] for r in as_json] == [run_id]
    assert json.loads(run(app, "history", "--kind", "train", "--json").stdout) == []

    # a second run against the first: exit 0 or 3, consistent with the printed comparison
    second = run(
        app, "bench", "mlp", "--batch-size", "8", "--baseline", run_id, "--fail-on-regression", "5%", *FAST
    )
    assert second.exit_code in (0, 3), second.output
    assert f"p50 vs baseline run {run_id}" in second.output
    comparison = History(history_path).get(_run_id(second.output)).results["comparison"]
    assert comparison["baseline_run"] == run_id and comparison["threshold"] == 0.05
    slower = comparison["rows"][0]["change"] > 0.05
    assert comparison["regressions"] == (["fp32"] if slower else [])
    assert (second.exit_code == 3) == slower
    assert ("REGRESSION" in second.output) == slower
    assert ("no variant slower than the baseline by more than 5%" in second.output) == (not slower)


def test_regression_against_an_absurdly_fast_baseline_exits_3(app):
    base = _fake_bench(1e-6)
    res = run(
        app, "bench", "mlp", "--batch-size", "8", "--baseline", base, "--fail-on-regression", "0.05", *FAST
    )
    assert res.exit_code == bench_cli.EXIT_REGRESSION, res.output
    assert f"REGRESSION: 1 variant(s) slower than {base} by more than 5%" in res.output
    assert "fp32: p50" in res.output and "vs 1e-06 ms" in res.output
    # the run is recorded all the same, pointing at its baseline
    recorded = History().list(kind="bench", name="mlp")[0]
    assert recorded.parent == base and recorded.results["comparison"]["regressions"] == ["fp32"]


def test_baseline_without_threshold_only_compares(app):
    base = _fake_bench(1e-6)
    res = run(app, "bench", "mlp", "--batch-size", "8", "--baseline", "bench:fake", *FAST)
    assert res.exit_code == 0, res.output
    assert f"p50 vs baseline run {base}" in res.output and "REGRESSION" not in res.output


def test_baseline_must_match_batch_size_and_variants(app):
    other_batch = _fake_bench(1.0, batch_size=16)
    res = run(app, "bench", "mlp", "--batch-size", "8", "--baseline", other_batch, *FAST)
    assert isinstance(res.exception, KilnError)
    assert "measured at batch size 16 and this run uses 8" in str(res.exception)
    other_variant = _fake_bench(1.0, variants=("compile",))
    res = run(app, "bench", "mlp", "--batch-size", "8", "--baseline", other_variant, *FAST)
    assert isinstance(res.exception, KilnError) and "no variant in common" in str(res.exception)
    assert "it has compile, this run measures fp32" in str(res.exception)
    assert History().list(kind="bench", name="mlp") == []  # refused before measuring anything


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "x", "--fail-on-regression", "5"], "ambiguous"),
        (["--baseline", "x", "--fail-on-regression", "lots"], "not a threshold"),
        (["--fail-on-regression", "5%"], "needs --baseline"),
    ],
)
def test_bad_regression_options(app, args, message):
    res = run(app, "bench", "mlp", *args)
    assert res.exit_code == 2 and message in res.output


def test_unknown_variant_is_refused_before_building(app):
    res = run(app, "bench", "mlp", "--variant", "fp8")
    assert isinstance(res.exception, VariantError) and "known variants: bf16" in str(res.exception)


def test_bench_a_recipe_with_a_sweep_and_json(app, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    res = run(
        app,
        "bench",
        str(recipe),
        "--batch-size",
        "4",
        "--sweep",
        "--max-batch-size",
        "4",
        "--name",
        "digits-mlp",
        "--json",
        *FAST,
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    results = out["results"]
    assert results["model"] == "mlp" and results["batch_size"] == 4
    assert [p["batch_size"] for p in results["sweep"]] == [1, 2, 4] and results[
        "sweep_stopped"
    ] == "max batch 4"
    recorded = History().get(out["run_id"])
    assert recorded.name == "digits-mlp" and recorded.config["recipe"] == str(recipe)


def test_recipe_inputs_are_a_real_batch_without_the_target():
    from torchkiln.zoo import create_dataset

    data = create_dataset("digits", "train")
    x = bench_cli.bench_inputs_from_recipe(data, 5)
    assert isinstance(x, tuple) and len(x) == 1 and x[0].shape == (5, 64)
    assert torch.equal(x[0][0], data[0][0])
    dict_data = [{"input_ids": torch.arange(3) + i, "labels": torch.tensor(i)} for i in range(2)]
    batch = bench_cli.bench_inputs_from_recipe(dict_data, 3)  # cycles through a small dataset
    assert list(batch) == ["input_ids"] and batch["input_ids"][:, 0].tolist() == [0, 1, 0]


def test_history_show_and_compare_bench_runs(app):
    a = _fake_bench(2.0, variants=("fp32", "bf16"))
    b = _fake_bench(3.0, variants=("fp32", "bf16"))
    shown = run(app, "history", "show", a)
    assert shown.exit_code == 0, shown.output
    assert f"run {a}" in shown.output and "bf16" in shown.output
    as_json = json.loads(run(app, "history", "show", a, "--json").stdout)
    assert as_json["id"] == a and as_json["results"]["variants"][0]["latency_ms"]["p50"] == 2.0

    cmp = run(app, "history", "compare", a, b)
    assert cmp.exit_code == 0, cmp.output
    assert "+50.0%" in cmp.output and "1.500" in cmp.output
    rows = json.loads(run(app, "history", "compare", a, b, "--json").stdout)["rows"]
    assert [(r["variant"], r["time_ratio"]) for r in rows] == [("fp32", 1.5), ("bf16", 1.5)]


def test_history_compare_train_runs_and_errors(app):
    h = History()
    a = h.record("train", "mlp", {"summary": {"final_loss": 1.0, "val_accuracy": 0.5}}, env={})
    b = h.record("train", "mlp", {"summary": {"final_loss": 0.25, "val_accuracy": 0.75}}, env={})
    cmp = run(app, "history", "compare", a, b)
    assert cmp.exit_code == 0, cmp.output
    assert "final_loss" in cmp.output and "-0.75" in cmp.output and "val_accuracy" in cmp.output
    listed = json.loads(run(app, "history", "--kind", "train", "--json").stdout)
    assert [r["key_figures"] for r in listed] == [
        "final loss 0.25, val_accuracy 0.75",
        "final loss 1, val_accuracy 0.5",
    ]
    bench_run = _fake_bench(1.0)
    mixed = run(app, "history", "compare", a, bench_run)
    assert isinstance(mixed.exception, KilnError) and "cannot compare a 'train' run" in str(mixed.exception)
    assert run(app, "history", "--kind", "nope").exit_code == 2
    missing = run(app, "history", "show", "nothing-here")
    assert isinstance(missing.exception, KilnError) and "no run 'nothing-here'" in str(missing.exception)


def test_history_empty_and_db_option(app, tmp_path):
    res = run(app, "history")
    assert res.exit_code == 0 and "no recorded runs" in res.output
    other = tmp_path / "other.sqlite"
    rid = History(other).record("bench", "elsewhere", {"variants": []}, env={})
    res = run(app, "history", "--db", str(other), "--json")
    assert [r["id"] for r in json.loads(res.stdout)] == [rid]
    res = run(app, "history", "--db", str(other), "show", rid, "--json")
    assert json.loads(res.stdout)["name"] == "elsewhere"


def test_docstring_examples():
    import doctest

    result = doctest.testmod(bench_cli, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
