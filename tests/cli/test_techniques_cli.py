"""``kiln techniques`` lists every registered technique with what it needs on this machine."""

from __future__ import annotations

from typer.testing import CliRunner

from torchkiln.cli.main import app
from torchkiln.compress.registry import list_techniques


def test_lists_every_family_and_says_what_is_missing() -> None:
    result = CliRunner().invoke(app, ["techniques"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    names = list_techniques()
    assert {n.split("/")[0] for n in names} >= {"quantize", "prune", "distill"}
    for name in names:
        assert name in result.output
    assert "ok" in result.output


def test_pattern_filters_and_an_unmatched_pattern_fails() -> None:
    result = CliRunner().invoke(app, ["techniques", "prune/*"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "prune/channels" in result.output
    assert "quantize/" not in result.output
    missing = CliRunner().invoke(app, ["techniques", "nothing/*"])
    assert missing.exit_code == 1 and "no technique matches" in missing.output
