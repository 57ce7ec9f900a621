"""``kiln demo --quick`` runs end to end: both training variants of every built-in model, then optimize
for inference on the trained resnet-tiny, a serve + loadtest of the chosen artifact, and the report."""

import json

import pytest
from typer.testing import CliRunner

from torchkiln.cli.main import app


@pytest.mark.slow
def test_demo_quick(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "baseline vs optimized" in res.output
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert [c["title"] for c in summary["cases"]] == [
        "mlp / digits",
        "resnet-tiny / digits",
        "gpt-tiny / pycode",
    ]
    for case in summary["cases"]:
        for variant in ("baseline", "optimized"):
            run = case[variant]
            assert run["steps"] > 0 and run["samples_per_s"] > 0 and "val_loss" in run["val"]
    assert summary["cases"][0]["optimized"]["val"]["val_accuracy"] > 0.8
    story = summary["optimize"]
    assert story["baseline"] == "eager" and len(story["variants"]) >= 3
    assert story["chosen"] is None or story["chosen"] in {v["name"] for v in story["variants"]}
    assert story["artifact"] and "report:" in res.output and "headline numbers" in res.output
    assert (tmp_path / "report.html").is_file()
    if "loadtest" in summary:
        assert summary["loadtest"]["ok"] > 0 and not summary["loadtest"]["errors"]
    else:
        assert summary["serve_skipped"]
