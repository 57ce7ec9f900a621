"""``kiln env`` through Typer's CliRunner on a small app of its own."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from torchkiln.cli import env as env_cli
from torchkiln.measure import flops


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    env_cli.register(app)
    return app


@pytest.fixture
def fake_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHKILN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(flops, "_measure_gemm_peak", lambda d, dev: (calls.append(d), (2.5e11, 2048))[1])
    return calls


def test_env_json_no_peak_is_valid_json(app, fake_peak):
    result = CliRunner().invoke(app, ["env", "--json", "--no-peak"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "cpu" in data and "flags" in data["cpu"] and "peak_flops" not in data
    assert fake_peak == []


def test_env_json_with_peak(app, fake_peak):
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert all(v == 2.5e11 for v in data["peak_flops"].values())


def test_env_table_marks_cached_and_measured(app, fake_peak):
    runner = CliRunner()
    first = runner.invoke(app, ["env"])
    assert first.exit_code == 0, first.output
    assert "measured now" in first.stdout and "250.0 GFLOP/s" in first.stdout
    assert "avx512_bf16" in first.stdout
    second = runner.invoke(app, ["env"])
    assert "(cached)" in second.stdout
    n = len(fake_peak)
    runner.invoke(app, ["env", "--refresh"])
    assert len(fake_peak) == 2 * n


def test_env_no_peak_table(app, fake_peak):
    result = CliRunner().invoke(app, ["env", "--no-peak"])
    assert result.exit_code == 0, result.output
    assert "GEMM peak" not in result.stdout and "torch" in result.stdout
