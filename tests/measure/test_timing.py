"""Structure and conventions of the timing helpers (no speed assertions)."""

from __future__ import annotations

import time

import pytest
import torch

from torchkiln.measure import RatioStats, TimingStats, interleaved_ratio, percentile, set_threads, time_fn


def test_percentile_matches_linear_interpolation():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 25) == 1.75
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_time_fn_structure_and_warmup():
    calls = []
    stats = time_fn(lambda: calls.append(1), warmup=2, min_rounds=5, max_rounds=7)
    assert isinstance(stats, TimingStats)
    assert 5 <= stats.rounds <= 7 and len(stats.times) == stats.rounds
    assert len(calls) == stats.rounds + 2
    assert stats.min <= stats.p50 <= stats.p90 <= stats.p99 <= stats.max
    assert stats.median == stats.p50 and stats.iqr >= 0
    assert set(stats.to_dict()) >= {"median", "iqr", "rel_iqr", "rounds", "times"}


def test_time_fn_calls_sync_and_stops_on_max_rounds():
    syncs = []
    n = 0

    def noisy():
        nonlocal n
        n += 1
        time.sleep(0.001 if n % 2 else 0.004)  # spread far above target: never converges

    sync = lambda: syncs.append(1)
    stats = time_fn(noisy, warmup=0, min_rounds=3, max_rounds=6, target_iqr=0.01, sync=sync)
    assert stats.rounds == 6 and not stats.converged
    assert len(syncs) >= stats.rounds


def test_time_fn_rejects_bad_rounds():
    with pytest.raises(ValueError):
        time_fn(lambda: None, min_rounds=5, max_rounds=2)


def test_interleaved_ratio_convention_slower_b():
    order = []

    def a():
        order.append("a")
        time.sleep(0.002)

    def b():
        order.append("b")
        time.sleep(0.006)

    r = interleaved_ratio(a, b, warmup=1, min_pairs=5, max_pairs=8)
    assert isinstance(r, RatioStats)
    assert 5 <= r.pairs <= 8
    assert len(r.speedups) == len(r.times_a) == len(r.times_b) == r.pairs
    assert r.speedup < 0.8  # B is ~3x slower: speedup of B over A is well under 1
    assert r.time_ratio > 1.25
    assert r.q1 <= r.speedup <= r.q3 and r.iqr >= 0
    timed = order[2:]  # after one warm-up pair
    assert timed[:4] == ["a", "b", "b", "a"]  # alternating which goes first


def test_set_threads_restores():
    before = torch.get_num_threads()
    with set_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with set_threads(None) as n:
        assert n == before
    with pytest.raises(RuntimeError), set_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
