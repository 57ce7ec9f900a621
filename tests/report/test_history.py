"""The run history: concurrent and killed writers, foreign files refused untouched, run lookup,
summaries and comparisons."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchkiln.report.history import (
    History,
    HistoryError,
    Run,
    compare_bench_results,
    compare_runs,
    key_figures,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _history_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHKILN_HISTORY", str(tmp_path / "default.sqlite"))


def _bench_results(p50: float, batch_size: int = 8, names=("fp32",)) -> dict:
    return {
        "model": "mlp",
        "batch_size": batch_size,
        "threads": 1,
        "device": "cpu",
        "baseline": names[0],
        "variants": [
            {
                "name": n,
                "latency_ms": {"p50": p50 * (i + 1)},
                "rounds": 10,
                "speedup_vs_baseline": 1 / (i + 1),
            }
            for i, n in enumerate(names)
        ],
    }


def test_default_path_comes_from_the_environment(tmp_path):
    h = History()
    assert h.path == tmp_path / "default.sqlite" and h.path.exists()


# --------------------------------------------------------------------------------------- concurrency


def _writer(path: str, worker: int, count: int, start) -> None:
    start.wait(30)
    history = History(path)
    for i in range(count):
        history.record("bench", f"w{worker}", {"i": i, "worker": worker}, env={})


def test_concurrent_writers_all_land(tmp_path):
    path = str(tmp_path / "h.sqlite")  # created by the racing writers themselves
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(path, w, 25, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    runs = History(path).list(limit=1000)
    assert len(runs) == 100 and len({r.id for r in runs}) == 100
    got = sorted((r.results["worker"], r.results["i"]) for r in runs)
    assert got == [(w, i) for w in range(4) for i in range(25)]


KILLED_WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA cache_size = 1")   # spill the uncommitted pages into the WAL file
    conn.execute("BEGIN IMMEDIATE")
    for i in range(300):
        conn.execute(
            "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (f"half-{i}", "bench", "killed", "2000-01-01T00:00:00+00:00", "ok", None, None,
             "{}", "{}", '{"pad": "' + "x" * 4000 + '"}', "{}"),
        )
    print("in transaction", flush=True)
    time.sleep(120)
    """
)


def test_killed_writer_leaves_a_usable_database(tmp_path):
    path = tmp_path / "h.sqlite"
    history = History(path)
    before = [
        history.record("train", "prior", {"summary": {"final_loss": 1.0 + i}}, env={}) for i in range(3)
    ]
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "in transaction", child.stderr.read()
        assert (tmp_path / "h.sqlite-wal").stat().st_size > 100_000  # the half-written transaction is on disk
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL

    reopened = History(path, timeout_s=5)
    runs = reopened.list(limit=1000)
    assert sorted(r.id for r in runs) == sorted(before)  # prior records intact, none of the killed ones
    new = reopened.record("bench", "after", _bench_results(1.0), env={})
    assert reopened.get(new).name == "after"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --------------------------------------------------------------------------------------- foreign files


def test_refuses_random_bytes_untouched(tmp_path):
    path = tmp_path / "notes.sqlite"
    data = os.urandom(8192)
    path.write_bytes(data)
    with pytest.raises(HistoryError, match="is not a torchkiln history database"):
        History(path)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]


def test_refuses_a_foreign_sqlite_database_untouched(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    data = path.read_bytes()
    with pytest.raises(HistoryError, match="SQLite database but not a torchkiln history database") as info:
        History(path)
    assert "left untouched" in str(info.value)
    assert path.read_bytes() == data


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "h.sqlite"
    History(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(HistoryError, match="newer torchkiln"):
        History(path)


# --------------------------------------------------------------------------------------- lookup


def test_get_by_id_prefix_and_kind_name(tmp_path):
    h = History(tmp_path / "h.sqlite")
    a = h.record("bench", "mlp", _bench_results(1.0), env={})
    b = h.record("bench", "mlp", _bench_results(2.0), env={})
    t = h.record("train", "mlp", {"summary": {"final_loss": 0.5}}, env={})
    assert h.get(a).id == a and h.get(b[:-2]).id == b
    assert h.get("bench:mlp").id == b  # the newest bench run named mlp (a kind prefix is not an id prefix)
    assert h.get("train:mlp").id == t
    with pytest.raises(HistoryError, match="ambiguous"):
        h.get("bench-")
    with pytest.raises(HistoryError, match="no run 'bench:resnet'"):
        h.get("bench:resnet")
    with pytest.raises(HistoryError, match="not a run kind"):
        h.get("nope:mlp")
    with pytest.raises(HistoryError, match="no run 'zzz'"):
        h.get("zzz")


def test_an_exact_id_wins_over_longer_ids_with_that_prefix(tmp_path):
    h = History(tmp_path / "h.sqlite")
    for rid in ("run_1", "run_10", "run_11", "runX1"):
        h.record("other", rid, {}, env={}, run_id=rid)
    assert h.get("run_1").id == "run_1"
    assert h.get("runX").id == "runX1"
    with pytest.raises(HistoryError, match="ambiguous"):
        h.get("run_")  # '_' is a character here, not a LIKE wildcard: matches run_1, run_10, run_11 only
    with pytest.raises(HistoryError, match="already exists"):
        h.record("other", "dup", {}, env={}, run_id="run_1")


def test_list_filters_and_orders(tmp_path):
    h = History(tmp_path / "h.sqlite")
    ids = [h.record("bench", f"m{i % 2}", _bench_results(1.0), env={}) for i in range(4)]
    h.record("train", "m0", {}, env={})
    assert [r.id for r in h.list(kind="bench")] == ids[::-1]
    assert [r.id for r in h.list(kind="bench", name="m0")] == [ids[2], ids[0]]
    assert len(h.list(limit=2)) == 2
    assert h.latest("bench", "m1").id == ids[3]


# --------------------------------------------------------------------------------------- summaries


def test_key_figures_per_kind():
    bench = Run("b", "bench", "mlp", "t", results=_bench_results(1.5, names=("fp32", "bf16")))
    bench.results["variants"][1]["speedup_vs_baseline"] = 1.8
    assert key_figures(bench) == "fp32 p50 1.5 ms @ batch 8; best bf16 1.80x"
    train = Run(
        "t",
        "train",
        "mlp",
        "t",
        results={"summary": {"final_loss": 0.25, "val_accuracy": 0.97, "samples_per_s": 1e4}},
    )
    assert key_figures(train) == "final loss 0.25, val_accuracy 0.97, 1e+04 samples/s"
    profile = Run("p", "profile", "gpt", "t", results={"step_ms": 12.5, "mfu": 0.15})
    assert key_figures(profile) == "step 12.5 ms, MFU 15.0%"
    assert key_figures(Run("x", "other", "x", "t")) == ""


def test_compare_bench_and_train_runs():
    a = Run("a", "bench", "mlp", "t", results=_bench_results(2.0, names=("fp32", "bf16")))
    b = Run("b", "bench", "mlp", "t", results=_bench_results(3.0, batch_size=16, names=("fp32", "compile")))
    cmp = compare_runs(a, b)
    assert [r["variant"] for r in cmp["rows"]] == ["fp32"]
    assert cmp["rows"][0]["time_ratio"] == pytest.approx(1.5) and cmp["rows"][0]["change"] == pytest.approx(
        0.5
    )
    assert cmp["only_base"] == ["bf16"] and cmp["only_new"] == ["compile"]
    assert cmp["warnings"] == ["batch_size differs: 8 vs 16"]

    ta = Run(
        "c", "train", "mlp", "t", results={"summary": {"final_loss": 1.0, "val_accuracy": 0.5, "x": "s"}}
    )
    tb = Run("d", "train", "mlp", "t", results={"summary": {"final_loss": 0.5, "val_accuracy": 0.75}})
    rows = {r["metric"]: r for r in compare_runs(ta, tb)["rows"]}
    assert rows["final_loss"]["diff"] == -0.5 and rows["val_accuracy"]["b"] == 0.75 and "x" not in rows
    with pytest.raises(HistoryError, match="cannot compare"):
        compare_runs(a, ta)
    assert compare_bench_results({}, {})["rows"] == []


def test_docstring_examples():
    import doctest

    import torchkiln.report.history as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_cache_entries_persist_replace_and_clear(tmp_path):
    path = tmp_path / "h.sqlite"
    h = History(path)
    assert h.cache_get("optimize:abc") == {}
    h.cache_put("optimize:abc", "eager", {"speedup": 1.0})
    h.cache_put("optimize:abc", "onnxruntime", {"speedup": 2.0})
    h.cache_put("optimize:abc", "eager", {"speedup": 1.5})  # replaced, not duplicated
    h.cache_put("optimize:def", "eager", {"speedup": 9.0})
    again = History(path)  # another handle (another process) sees them
    assert again.cache_get("optimize:abc") == {"onnxruntime": {"speedup": 2.0}, "eager": {"speedup": 1.5}}
    assert again.cache_clear("optimize:abc") == 2 and again.cache_get("optimize:abc") == {}
    assert again.cache_get("optimize:def") == {"eager": {"speedup": 9.0}}


def test_cache_table_is_added_to_a_database_written_without_it(tmp_path):
    path = tmp_path / "old.sqlite"
    rid = History(path).record("bench", "mlp", _bench_results(1.0), env={})
    with sqlite3.connect(path) as conn:  # a file from before the cache table existed
        conn.execute("DROP TABLE cache")
    h = History(path)
    h.cache_put("ns", "k", [1, 2])
    assert h.cache_get("ns") == {"k": [1, 2]} and h.get(rid).name == "mlp"
