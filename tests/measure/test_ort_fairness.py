"""Timing fairness between runtimes: the ONNX Runtime session options every torchkiln session gets, and
interleaved_compare's settling after callables whose threads stay busy.

No timing is asserted (BENCHMARKING.md): these check the option plumbing and the order of calls.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
import time

import pytest
import torch

import torchkiln as tk
from torchkiln.measure import interleaved_compare

bench_module = importlib.import_module("torchkiln.measure.bench")

SPIN = "session.intra_op.allow_spinning"
STOP = "session.force_spinning_stop"


# ------------------------------------------------------------------------------------ session options


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_mlp(tmp_path_factory, ort):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(16,)).eval()
    path = tmp_path_factory.mktemp("ort") / "mlp.onnx"
    tk.export(model, model.example_inputs(2), path, format="onnx", verbose=False)
    return model, path


def _config(session, key: str) -> str:
    return session.get_session_options().get_session_config_entry(key)


def test_session_options_spin_inside_a_run_and_stop_after(ort):
    from torchkiln.compress._onnx import ort_session_options

    opts = ort_session_options(3)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.get_session_config_entry(SPIN) == "1"
    assert opts.get_session_config_entry(STOP) == "1"
    assert ort_session_options(1, spin_after_run=True).get_session_config_entry(STOP) == "0"
    basic = ort_session_options(1, optimization="basic")
    assert basic.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": 0}, "threads must be a positive integer"),
        ({"threads": 1, "optimization": "max"}, "basic"),
    ],
)
def test_session_options_refuse_bad_values(ort, kwargs, match):
    from torchkiln.compress._onnx import ort_session_options

    with pytest.raises(ValueError, match=match):
        ort_session_options(**kwargs)


def test_predictor_session_uses_the_shared_options(onnx_mlp):
    model, path = onnx_mlp
    predictor = tk.export.load_predictor(path, threads=2)
    session = predictor._session
    assert session.get_session_options().intra_op_num_threads == 2
    assert _config(session, SPIN) == "1" and _config(session, STOP) == "1"
    predictor.threads = 1  # the session is rebuilt with the same options and the new count
    assert predictor._session is not session
    assert predictor._session.get_session_options().intra_op_num_threads == 1
    assert _config(predictor._session, STOP) == "1"
    x = model.example_inputs(3)[0]
    with torch.no_grad():
        torch.testing.assert_close(predictor(x), model(x), rtol=1e-4, atol=1e-5)


def test_onnxruntime_module_uses_the_shared_options(onnx_mlp):
    from torchkiln.compress._onnx import OnnxRuntimeModule

    model, path = onnx_mlp
    module = OnnxRuntimeModule(path, threads=2, optimization="extended")
    opts = module.session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert _config(module.session, SPIN) == "1" and _config(module.session, STOP) == "1"
    import onnxruntime as ort

    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    copied = module.__deepcopy__({})
    assert _config(copied.session, STOP) == "1" and copied.threads == 2
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxRuntimeModule(path, optimization="max")


# ------------------------------------------------------------------------------------ settling


class _FakeClock:
    """perf_counter / process_time / sleep for bench's module: a thread of this process spins for the
    ``busy`` intervals of wall time (one core), quiet otherwise."""

    def __init__(self, busy: list[tuple[float, float]]) -> None:
        self.now, self.cpu, self.busy = 0.0, 0.0, busy

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return self.cpu

    def sleep(self, seconds: float) -> None:
        for lo, hi in self.busy:
            self.cpu += max(0.0, min(hi, self.now + seconds) - max(lo, self.now))
        self.now += seconds


@pytest.mark.parametrize(
    ("busy", "expected"),
    [
        ([], 0.0),
        ([(0.0, 0.04)], 0.04),
        # preempted for one slice in the middle: still one tail, not a quiet process
        ([(0.0, 0.02), (0.022, 0.04)], 0.04),
        ([(0.0, 10.0)], 0.1),  # never quiet: capped
    ],
)
def test_busy_after_reads_the_tail_from_cpu_time_without_thread_states(monkeypatch, busy, expected):
    monkeypatch.setattr(bench_module, "time", _FakeClock(busy))
    monkeypatch.setattr(bench_module, "_other_threads_running", lambda: None)
    assert bench_module.busy_after() == pytest.approx(expected, abs=0.0021)


def test_busy_after_reads_the_tail_from_thread_states(monkeypatch):
    clock = _FakeClock([])  # no CPU time at all: only the states count
    states = iter([True] * 10 + [False, True] + [False] * 10)  # 20 ms busy, one quiet slice, 2 ms busy
    monkeypatch.setattr(bench_module, "time", clock)
    monkeypatch.setattr(bench_module, "_other_threads_running", lambda: next(states))
    assert bench_module.busy_after() == pytest.approx(0.024, abs=1e-9)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread states from /proc")
def test_busy_after_sees_a_real_spinning_thread():
    stop, spinning = threading.Event(), threading.Event()

    def spin() -> None:  # busy ~60 ms, like a pool thread after a call (hashing drops the GIL)
        block = bytes(8 << 20)
        end = time.perf_counter() + 0.06
        while time.perf_counter() < end and not stop.is_set():
            spinning.set()
            hashlib.sha256(block)

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        assert spinning.wait(5.0)
        tail = bench_module.busy_after(max_s=0.5)
    finally:
        stop.set()
        worker.join()
    assert 0.01 < tail < 0.5


def test_busy_after_reads_a_quiet_process_as_quiet():
    bench_module.busy_after()  # threads of earlier tests' work go quiet
    assert bench_module.busy_after() < 0.01


class _Recorder:
    """Callables that log their calls, and a timed_call that marks which of those calls were timed."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[list] = []  # [name, timed]
        self._timing = False
        real = bench_module.timed_call

        def timed_call(fn, sync=None):
            self._timing = True
            try:
                return real(fn, sync)
            finally:
                self._timing = False

        monkeypatch.setattr(bench_module, "timed_call", timed_call)

    def fn(self, name: str):
        def call() -> None:
            self.events.append([name, self._timing])
            time.sleep(0.0005)

        return call

    def tokens(self, skip: int) -> list[str]:
        """``aT`` a timed call of a, ``bU`` one or more untimed calls of b in a row (after ``skip``)."""
        out: list[str] = []
        for name, timed in self.events[skip:]:
            token = f"{name}{'T' if timed else 'U'}"
            if not timed and out and out[-1] == token:
                continue
            out.append(token)
        return out


def test_settling_runs_the_next_callable_untimed_after_a_busy_one(monkeypatch):
    rec = _Recorder(monkeypatch)
    # quiet before the first calls; then, per probe, a's threads busy 4 ms after it returns, b's not
    tails = iter([0.0] + [0.004, 0.0] * 3)
    monkeypatch.setattr(bench_module, "busy_after", lambda *a, **k: next(tails))
    c = interleaved_compare({"a": rec.fn("a"), "b": rec.fn("b")}, warmup=2, min_rounds=6, max_rounds=6)
    assert c.settle_s == {"a": pytest.approx(0.012), "b": 0.0}
    # first calls (2) and warm-up rounds (2 x 2) first; then rounds a b | b a | ...: at each switch the
    # next callable runs untimed first (after a for a's tail, after b once); no switch, no extra call
    assert rec.tokens(skip=6) == ["aT", "bU", "bT", "bT", "aU", "aT"] * 3
    settle_runs = [n for n in rec.events[6:] if n == ["b", False]]
    assert len(settle_runs) >= 3  # b ran >= 12 ms untimed after each timed a (0.5 ms a call)
    assert c.rounds == 6 and {len(t.times) for t in c.timings.values()} == {6}


@pytest.mark.parametrize(("settle", "tail_s"), [(True, 0.0), (False, 0.05)])
def test_no_settling_for_quiet_callables_or_when_off(monkeypatch, settle, tail_s):
    calls: list[str] = []
    monkeypatch.setattr(bench_module, "busy_after", lambda *a, **k: tail_s)
    c = interleaved_compare(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        warmup=0,
        min_rounds=2,
        max_rounds=2,
        settle=settle,
    )
    assert calls == ["a", "b"] + ["a", "b"] + ["b", "a"]
    assert c.settle_s == {"a": 0.0, "b": 0.0}


def test_one_callable_is_never_probed(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("busy_after called for a single callable")

    monkeypatch.setattr(bench_module, "busy_after", fail)
    c = interleaved_compare({"a": lambda: None}, warmup=1, min_rounds=3, max_rounds=3)
    assert c.rounds == 3 and c.settle_s == {"a": 0.0}
