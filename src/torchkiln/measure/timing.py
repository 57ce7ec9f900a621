"""Wall-clock timing that follows BENCHMARKING.md: warm up, repeat adaptively, compare A and B interleaved.

``time_fn`` times one callable; ``interleaved_ratio`` compares two callables inside one process by
alternating them (A B, B A, A B, ...) and reporting the median of the per-pair ratios, which cancels
most of the drift a noisy shared machine adds. ``set_threads`` fixes ``torch.set_num_threads`` for a
block and restores it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["RatioStats", "TimingStats", "interleaved_ratio", "percentile", "set_threads", "time_fn"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation (numpy's default).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    """
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _iqr(values: list[float]) -> float:
    return percentile(values, 75) - percentile(values, 25)


def timed_call(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each
    clock read so queued device work is inside the measurement.

    >>> timed_call(lambda: None) >= 0
    True
    """
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def _auto_sync() -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` when CUDA is in use in this process, else None."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return None


@dataclass(frozen=True)
class TimingStats:
    """Per-call times in seconds of one timed callable (warm-up calls excluded)."""

    times: list[float] = field(repr=False)
    median: float
    mean: float
    min: float
    max: float
    iqr: float
    p50: float
    p90: float
    p99: float
    rounds: int
    warmup: int
    converged: bool  # stopped because IQR/median fell under the target (not on rounds or time)

    @property
    def rel_iqr(self) -> float:
        """IQR / median: the spread the adaptive loop tries to push under ``target_iqr``."""
        return self.iqr / self.median if self.median > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rel_iqr"] = self.rel_iqr
        return d

    @classmethod
    def from_times(cls, times: list[float], *, warmup: int = 0, converged: bool = False) -> TimingStats:
        return cls(
            times=list(times),
            median=percentile(times, 50),
            mean=sum(times) / len(times),
            min=min(times),
            max=max(times),
            iqr=_iqr(times),
            p50=percentile(times, 50),
            p90=percentile(times, 90),
            p99=percentile(times, 99),
            rounds=len(times),
            warmup=warmup,
            converged=converged,
        )


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    min_rounds: int = 5,
    max_rounds: int = 50,
    target_iqr: float = 0.10,
    max_time_s: float = 10.0,
    sync: Callable[[], None] | None = None,
) -> TimingStats:
    """Time ``fn()`` after ``warmup`` discarded calls, adaptively.

    Stops once ``rounds >= min_rounds`` and IQR/median < ``target_iqr`` (``converged=True``), or when
    ``max_rounds`` is reached, or when the timed rounds have used ``max_time_s``. ``min_rounds`` is always
    honoured, even past ``max_time_s``. ``sync`` is called before each clock read; by default it is
    ``torch.cuda.synchronize`` when CUDA has been initialised in this process (checked after warm-up),
    so GPU work is finished before the clock is read.

    >>> stats = time_fn(lambda: sum(range(100)), warmup=1, min_rounds=5, max_rounds=5)
    >>> stats.rounds, stats.min <= stats.median <= stats.max
    (5, True)
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds=}, {max_rounds=}")
    for _ in range(warmup):
        fn()
    sync = sync if sync is not None else _auto_sync()
    if sync is not None:
        sync()
    times: list[float] = []
    spent = 0.0
    converged = False
    while True:
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if len(times) >= min_rounds:
            med = percentile(times, 50)
            if med > 0 and _iqr(times) / med < target_iqr:
                converged = True
                break
            if len(times) >= max_rounds or spent >= max_time_s:
                break
    return TimingStats.from_times(times, warmup=warmup, converged=converged)


@dataclass(frozen=True)
class RatioStats:
    """A/B comparison from interleaved pairs.

    Convention (one, used everywhere in torchkiln): ``speedup = median over pairs of t_a / t_b``; above 1
    means B is faster than A. ``time_ratio = median over pairs of t_b / t_a`` is B's time as a fraction of
    A's (below 1 means B is faster). ``iqr``/``q1``/``q3`` describe the per-pair speedups.
    """

    speedup: float
    time_ratio: float
    speedups: list[float] = field(repr=False)
    times_a: list[float] = field(repr=False)
    times_b: list[float] = field(repr=False)
    median_a: float
    median_b: float
    iqr: float
    q1: float
    q3: float
    pairs: int
    warmup: int
    converged: bool

    @property
    def rel_iqr(self) -> float:
        return self.iqr / self.speedup if self.speedup > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rel_iqr"] = self.rel_iqr
        return d


def interleaved_ratio(
    fn_a: Callable[[], Any],
    fn_b: Callable[[], Any],
    *,
    warmup: int = 2,
    min_pairs: int = 5,
    max_pairs: int = 40,
    target_iqr: float = 0.10,
    max_time_s: float = 30.0,
    sync: Callable[[], None] | None = None,
) -> RatioStats:
    """Compare ``fn_a`` (baseline) and ``fn_b`` (candidate) by timing them in alternating pairs.

    Each pair times A and B once; even pairs run A first, odd pairs B first, so a slow drift of the
    machine hits both sides equally. ``warmup`` pairs are discarded. Stops once ``pairs >= min_pairs`` and
    the IQR of the per-pair speedups over their median is under ``target_iqr``, or at ``max_pairs``, or
    when ``max_time_s`` of timed work is spent (``min_pairs`` always honoured). See :class:`RatioStats`
    for the convention: ``speedup > 1`` means B is faster.

    >>> r = interleaved_ratio(lambda: sum(range(50)), lambda: sum(range(50)), min_pairs=5, max_pairs=5)
    >>> r.pairs, len(r.speedups)
    (5, 5)
    """
    if min_pairs < 1 or max_pairs < min_pairs:
        raise ValueError(f"need 1 <= min_pairs <= max_pairs, got {min_pairs=}, {max_pairs=}")

    for _ in range(warmup):
        fn_a()
        fn_b()
    sync = sync if sync is not None else _auto_sync()

    def timed(fn: Callable[[], Any]) -> float:
        return timed_call(fn, sync)

    times_a: list[float] = []
    times_b: list[float] = []
    speedups: list[float] = []
    spent = 0.0
    converged = False
    while True:
        if len(times_a) % 2 == 0:
            ta = timed(fn_a)
            tb = timed(fn_b)
        else:
            tb = timed(fn_b)
            ta = timed(fn_a)
        times_a.append(ta)
        times_b.append(tb)
        speedups.append(ta / tb if tb > 0 else math.inf)
        spent += ta + tb
        n = len(speedups)
        if n >= min_pairs:
            med = percentile(speedups, 50)
            if 0 < med < math.inf and _iqr(speedups) / med < target_iqr:
                converged = True
                break
            if n >= max_pairs or spent >= max_time_s:
                break
    time_ratios = [tb / ta if ta > 0 else math.inf for ta, tb in zip(times_a, times_b, strict=True)]
    return RatioStats(
        speedup=percentile(speedups, 50),
        time_ratio=percentile(time_ratios, 50),
        speedups=speedups,
        times_a=times_a,
        times_b=times_b,
        median_a=percentile(times_a, 50),
        median_b=percentile(times_b, 50),
        iqr=_iqr(speedups),
        q1=percentile(speedups, 25),
        q3=percentile(speedups, 75),
        pairs=len(speedups),
        warmup=warmup,
        converged=converged,
    )


@contextmanager
def set_threads(n: int | None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(n)`` and restore the previous count afterwards.

    ``None`` keeps the current count. Yields the count in effect.

    >>> before = torch.get_num_threads()
    >>> with set_threads(1) as n:
    ...     n == torch.get_num_threads() == 1
    True
    >>> torch.get_num_threads() == before
    True
    """
    previous = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
