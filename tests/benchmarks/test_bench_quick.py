"""The benchmark scripts' contract: discovery, the JSON line, and one real (cheap) benchmark run.

Speed is not asserted here (BENCHMARKING.md: timing belongs to benchmarks, not tests); only that a
benchmark runs end to end and ends with one well-formed JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _common, run_all

REQUIRED_KEYS, figure, meets, record = _common.REQUIRED_KEYS, _common.figure, _common.meets, _common.record

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"train_overhead", "train_precision", "train_checkpointing", "train_compile", "train_mfu"}


def test_discovery_finds_every_benchmark() -> None:
    found = {b.name: b for b in run_all.discover()}
    assert EXPECTED <= set(found)
    assert all(b.module == b.name for b in found.values())
    assert found["train_precision"].threads == (1, 2)


def test_discovery_takes_a_dropped_in_file(tmp_path: Path) -> None:
    (tmp_path / "new_bench.py").write_text(
        'BENCH = "new_bench"\nTHREADS = (2,)\n\ndef main(argv=None):\n    pass\n'
    )
    (tmp_path / "helper.py").write_text("def main():\n    pass\n")  # no BENCH: not a benchmark
    (tmp_path / "_private.py").write_text('BENCH = "x"\ndef main():\n    pass\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    found = run_all.discover(tmp_path)
    assert [(b.name, b.threads) for b in found] == [("new_bench", (2,))]


def test_record_and_targets() -> None:
    figs = [
        figure(
            "ratio",
            0.97,
            ">= 0.98",
            spread={"min": 0.9, "q1": 0.95, "median": 0.97, "q3": 0.99, "max": 1.0, "n": 8},
        ),
        figure("extra_ms", 3.0, unit="ms"),
    ]
    rec = record("demo", figs, note="n", threads=1, torch="t", cpu="c", quick=True)
    assert rec["ratio"] == 0.97 and rec["met"] is False and rec["rounds"] == 8
    assert set(REQUIRED_KEYS) <= set(rec)
    assert meets(0.5, "<= 0.5") and meets(None, None) is None


def test_a_failing_run_is_recorded_not_fatal() -> None:
    failed = {"bench": "boom", "threads": 1, "failed": True, "met": False, "error": "exit code 1: ValueError"}
    ok = record("fine", [figure("speedup", 1.2)], threads=1, torch="t", cpu="c", quick=False)
    rows = run_all.table_rows([failed, ok])
    assert rows[0][5] == "**FAILED**" and "ValueError" in rows[0][7]
    assert rows[1][5] == "info"
    assert run_all.parse_last_json('warning\n{"bench": "x"}\n') == {"bench": "x"}
    assert run_all.parse_last_json("Traceback (most recent call last):") is None


@pytest.mark.slow
def test_quick_benchmark_ends_with_json(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.train_checkpointing",
            "--quick",
            "--threads",
            "1",
            "--layers",
            "2",
            "--batch-size",
            "4",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    result = json.loads(last)
    assert set(REQUIRED_KEYS) <= set(result)
    assert result["bench"] == "train_checkpointing" and result["key"] == "memory_ratio"
    assert result["threads"] == 1 and result["quick"] is True
    assert isinstance(result["met"], bool)
    assert 0 < result["memory_ratio"] < 1  # exact count: checkpointing keeps fewer activations
    assert result["time_ratio"] > 0 and result["spread"] == {} and result["rounds"] == 1
    assert {f["key"] for f in result["figures"]} >= {"memory_ratio", "time_ratio"}
    assert "memory_ratio" in proc.stderr  # the human table went to stderr
