"""The load tester against a real server: closed and open loop, the CLI's JSON, inputs from the spec."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from torchkiln.cli.main import app
from torchkiln.serve.loadtest import bodies_from_spec, loadtest


def test_loadtest_cli_json_against_a_real_server(zoo_servers) -> None:
    url, _, _ = zoo_servers["gpt-tiny"]
    result = CliRunner().invoke(
        app, ["loadtest", url, "--concurrency", "8", "--requests", "40", "--duration-s", "60", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output.strip().splitlines()[-1])
    res = doc["results"]
    assert doc["run_id"]
    assert res["requests"] == 40 and res["ok"] == 40 and res["errors"] == {}
    assert res["throughput_rps"] > 0
    assert res["latency_ms"]["p50"] <= res["latency_ms"]["p90"] <= res["latency_ms"]["p99"]
    assert res["server"]["inferences"] == 40 and res["server"]["executions"] <= 40


def test_open_loop_and_errors_by_status(zoo_servers, tmp_path: Path) -> None:
    url, _, _ = zoo_servers["mlp"]
    res = loadtest(url, rate=50, requests=20, duration_s=30)
    assert res.mode == "open" and res.ok == 20 and res.latency_ms["p99"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"inputs": {"x": [1, 2]}}\n{"inputs": {"x": [1, 2]}}\n')
    res = loadtest(url, concurrency=2, requests=6, input_file=str(bad))
    assert res.ok == 0 and res.errors == {"422": 6}


def test_generated_inputs_follow_the_spec() -> None:
    spec = {
        "inputs": [
            {"name": "idx", "dtype": "int64", "shape": [None], "max_shape": [12], "low": 0, "high": 5},
            {"name": "x", "dtype": "float32", "shape": [2, 3]},
        ]
    }
    bodies = [json.loads(b) for b in bodies_from_spec(spec, n=4, length=7)]
    for body in bodies:
        ids, x = body["inputs"]["idx"], body["inputs"]["x"]
        assert len(ids) == 7 and all(0 <= i < 5 for i in ids)
        assert len(x) == 2 and all(len(row) == 3 for row in x)
