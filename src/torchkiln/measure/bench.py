"""Inference benchmarking (``tk.bench``, ``kiln bench``): latency percentiles, an interleaved A/B/C...
comparison of variants with per-pair speedups, and throughput against batch size.

Follows BENCHMARKING.md: threads fixed and recorded (1 on CPU unless told otherwise), warm-up
discarded, every call timed on its own (CUDA synchronized before the clock is read), repetition until
IQR/median is under ``target_iqr`` or the time budget is spent, and variants compared inside one process
in round-robin rounds whose order alternates (as given, reversed, as given, ...), each variant's time
divided into the baseline's time of the same round. Speedups are the median of those per-round ratios.
Thread pools that keep a core busy after a call returns (OpenMP workers spin ~10 ms after a parallel
region) are measured, and the next variant is run untimed until they have gone quiet (see
:func:`busy_after`), so no variant is timed against the previous one's spinning threads.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> result = bench(model, torch.randn(8, 16), max_time_s=0.2)
>>> result.batch_size, result.threads, [v.name for v in result.variants]
(8, 1, ['fp32'])
>>> r = result.to_results()
>>> sorted(r["variants"][0]["latency_ms"])
['iqr', 'max', 'mean', 'min', 'p50', 'p90', 'p99']
>>> r["variants"][0]["speedup_vs_baseline"]
1.0
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure.timing import RatioStats, TimingStats, percentile, set_threads, time_fn, timed_call
from torchkiln.measure.variants import (
    Compile,
    PreparedVariant,
    VariantSpec,
    apply_variant,
    get_variant,
    model_device,
)

__all__ = [
    "BenchError",
    "BenchResult",
    "Comparison",
    "SweepPoint",
    "VariantResult",
    "bench",
    "busy_after",
    "interleaved_compare",
    "is_out_of_memory",
    "resize_batch",
]


class BenchError(KilnError, ValueError):
    """The benchmark was asked for something it cannot do (bad inputs, baseline not among variants...)."""


def _iqr(values: Sequence[float]) -> float:
    return percentile(list(values), 75) - percentile(list(values), 25)


def _rel_iqr(values: Sequence[float]) -> float:
    med = percentile(list(values), 50)
    return _iqr(values) / med if med > 0 and math.isfinite(med) else math.inf


# ------------------------------------------------------------------------------------------ interleaving


@dataclass(frozen=True)
class Comparison:
    """Round-robin timing of several callables: per-callable :class:`TimingStats` (seconds) and, for each,
    :class:`RatioStats` against the baseline (``speedup = t_baseline / t_variant`` per round, median)."""

    baseline: str
    timings: dict[str, TimingStats]
    ratios: dict[str, RatioStats]
    first_call_s: dict[str, float]
    rounds: int
    warmup: int
    converged: bool
    elapsed_s: float
    # Per callable: seconds the callable that follows it ran untimed first (its threads' measured busy
    # tail, see busy_after; 0 when its threads go quiet when it returns).
    settle_s: dict[str, float] = field(default_factory=dict)


# A slice of idle time in which this process used less than this share of one core is quiet (where
# thread states cannot be read).
_QUIET_SHARE = 0.3
_SLICE_S = 0.002
_MAX_TAIL_S = 0.1
_SETTLE_MARGIN = 3.0


def _other_threads_running() -> bool | None:
    """Whether a thread of this process other than the calling one is running or waiting for a core
    (state ``R`` in ``/proc/self/task/*/stat``); None where thread states cannot be read (not Linux)."""
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        if tid == str(me):
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # the thread has ended
        end = stat.rfind(b")")  # the thread's name is in parentheses and may hold anything
        if stat[end + 2 : end + 3] == b"R":
            return True
    return False


def busy_after(slice_s: float = _SLICE_S, max_s: float = _MAX_TAIL_S, quiet_slices: int = 3) -> float:
    """Seconds this process's other threads stay busy from now while the caller sleeps (call it right
    after a call returns), read in ``slice_s`` slices; the tail ends where ``quiet_slices`` slices in a
    row were quiet (at most ``max_s``).

    Pool threads spin for a while after a call before they block: OpenMP workers (torch eager and
    compiled code) ~10 ms after a parallel region, ONNX Runtime's ~40 ms after ``run`` unless the
    session stops them (``session.force_spinning_stop``). A call timed right after another runtime's
    call shares the cores with those spinning threads. A slice is busy when, at its end, another thread
    of this process is running or runnable (Linux: its state in ``/proc``, which a neighbour taking the
    cores does not change), else when the process used 30 % of a core in it.

    >>> busy_after() < 0.05  # nothing of this doctest spins
    True
    """
    start = time.perf_counter()
    quiet_since: float | None = None
    quiet = 0
    while True:
        t0, c0 = time.perf_counter(), time.process_time()
        if t0 - start >= max_s:
            return max_s
        time.sleep(slice_s)
        running = _other_threads_running()
        if running is None:
            running = time.process_time() - c0 >= _QUIET_SHARE * (time.perf_counter() - t0)
        if running:
            quiet_since, quiet = None, 0
            continue
        quiet_since = t0 if quiet_since is None else quiet_since
        quiet += 1
        if quiet >= quiet_slices:
            return quiet_since - start


def interleaved_compare(
    fns: Mapping[str, Callable[[], Any]],
    *,
    baseline: str | None = None,
    warmup: int = 5,
    min_warmup_s: float = 0.0,
    min_rounds: int = 10,
    max_rounds: int = 100_000,
    min_time_s: float = 0.0,
    target_iqr: float = 0.05,
    max_time_s: float = 10.0,
    sync: Callable[[], None] | None = None,
    settle: bool = True,
) -> Comparison:
    """Time several callables in rounds: every round calls each once, even rounds in the given order and
    odd rounds in reverse, so drift of a shared machine hits all of them alike. With one callable this is
    plain repeated timing.

    Settling (``settle=True``): after the first call and the first two warm-up rounds, each callable's
    busy tail is measured (:func:`busy_after`, the median of those three). When some callable leaves
    threads busy, every time the next call is of another callable, that one first runs untimed, at least
    once and for 3x the previous callable's tail, so it is timed with its own thread pool awake and
    without the other's spinning threads (the next call stays slowed for 2-3x the time the threads are
    seen spinning: on 2 cores, a small CNN at batch 32 ran as fast as in separate blocks from 3x on).
    When none does (one thread; pure Python; ONNX Runtime sessions that stop their pool) nothing extra
    runs. The time spent settling counts towards ``max_time_s``.

    Each callable is called once first (timed on its own as ``first_call_s``: compile time for compiled
    variants), then warm-up rounds are discarded: at least ``warmup`` of them and at least
    ``min_warmup_s`` seconds' worth. Stops once ``rounds >= min_rounds``, ``min_time_s`` has passed and,
    for every callable, IQR/median of its times and of its per-round ratios to the baseline are under
    ``target_iqr`` (``converged``); or at ``max_rounds``; or when ``max_time_s`` of wall time has passed
    in the timed rounds (``min_rounds`` always honoured). ``sync`` runs before each clock read.

    The time floor matters for fast calls: ten rounds of a 0.1 ms call are one millisecond of a
    machine whose neighbours come and go over tens of milliseconds, and can "converge" on a burst.

    >>> c = interleaved_compare({"a": lambda: sum(range(200)), "b": lambda: sum(range(200))},
    ...                         min_rounds=5, max_rounds=5, warmup=1)
    >>> c.rounds, c.ratios["a"].speedup, len(c.ratios["b"].speedups)
    (5, 1.0, 5)
    """
    names = list(fns)
    if not names:
        raise BenchError("interleaved_compare needs at least one callable")
    baseline = names[0] if baseline is None else baseline
    if baseline not in fns:
        raise BenchError(f"baseline {baseline!r} is not among the compared callables: {', '.join(names)}")
    if min_rounds < 1 or max_rounds < min_rounds:
        raise BenchError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds=}, {max_rounds=}")

    def timed(fn: Callable[[], Any]) -> float:
        return timed_call(fn, sync)

    # Busy tails need more than one callable to matter (a callable's own tail is its steady state).
    probing = settle and len(names) > 1
    tails: dict[str, list[float]] = {name: [] for name in names}
    if probing:
        busy_after()  # let threads still busy from earlier work go quiet, so no tail is read into ours
    first = {}
    for name in names:
        first[name] = timed(fns[name])
        if probing:
            tails[name].append(busy_after())
    orders = (names, names[::-1])
    warm_start, r = time.perf_counter(), 0
    while r < warmup or time.perf_counter() - warm_start < min_warmup_s:
        for name in orders[r % 2]:
            fns[name]()
            if probing and r < 2:
                tails[name].append(busy_after())
        r += 1
    warmup = r
    settle_s = {name: _SETTLE_MARGIN * percentile(t, 50) if t else 0.0 for name, t in tails.items()}
    settle_s = {name: s if s >= _SLICE_S else 0.0 for name, s in settle_s.items()}

    times: dict[str, list[float]] = {name: [] for name in names}
    others = [n for n in names if n != baseline]
    converged = False
    next_check = min_rounds
    start = time.perf_counter()
    rounds = 0
    # With any busy tail, every switch runs the next callable untimed first: at least once (its own pool
    # threads have gone to sleep while the other ran: one call wakes them) and for 3x the tail of the
    # one before it (its spinning threads have stopped, and the cores settled, by then).
    settling = any(settle_s.values())
    previous: str | None = None
    while True:
        for name in orders[rounds % 2]:
            if settling and previous is not None and previous != name:
                settle_start = time.perf_counter()
                fns[name]()
                while time.perf_counter() - settle_start < settle_s[previous]:
                    fns[name]()
            times[name].append(timed(fns[name]))
            previous = name
        rounds += 1
        if rounds < min_rounds:
            continue
        if rounds >= next_check and time.perf_counter() - start >= min_time_s:
            # Checking sorts every list: do it on a geometric schedule so the loop stays O(n log n).
            next_check = rounds + max(1, rounds // 10)
            base = times[baseline]
            spreads = [_rel_iqr(times[n]) for n in names]
            spreads += [
                _rel_iqr([b / t if t > 0 else math.inf for b, t in zip(base, times[n], strict=True)])
                for n in others
            ]
            if all(s < target_iqr for s in spreads):
                converged = True
                break
        if rounds >= max_rounds or time.perf_counter() - start >= max_time_s:
            break
    elapsed = time.perf_counter() - start

    timings = {n: TimingStats.from_times(times[n], warmup=warmup, converged=converged) for n in names}
    ratios = {n: _ratio_stats(times[baseline], times[n], warmup, converged) for n in names}
    return Comparison(baseline, timings, ratios, first, rounds, warmup, converged, elapsed, settle_s)


def _ratio_stats(times_a: list[float], times_b: list[float], warmup: int, converged: bool) -> RatioStats:
    speedups = [a / b if b > 0 else math.inf for a, b in zip(times_a, times_b, strict=True)]
    time_ratios = [b / a if a > 0 else math.inf for a, b in zip(times_a, times_b, strict=True)]
    return RatioStats(
        speedup=percentile(speedups, 50),
        time_ratio=percentile(time_ratios, 50),
        speedups=speedups,
        times_a=list(times_a),
        times_b=list(times_b),
        median_a=percentile(times_a, 50),
        median_b=percentile(times_b, 50),
        iqr=_iqr(speedups),
        q1=percentile(speedups, 25),
        q3=percentile(speedups, 75),
        pairs=len(speedups),
        warmup=warmup,
        converged=converged,
    )


# ---------------------------------------------------------------------------------------------- inputs


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the device (or host) ran out of memory.

    >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")), is_out_of_memory(ValueError("x"))
    (True, False)
    """
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text
    return False


def _batch_of(inputs: Any) -> int | None:
    """Size of dim 0 of the first tensor (None when there is no tensor with a dim)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    values = (
        inputs.values()
        if isinstance(inputs, Mapping)
        else inputs
        if isinstance(inputs, (tuple, list))
        else ()
    )
    for value in values:
        n = _batch_of(value)
        if n is not None:
            return n
    return None


def resize_batch(inputs: Any, batch_size: int) -> Any:
    """``inputs`` with every tensor whose dim 0 is the batch cut or tiled (repeating its rows) to
    ``batch_size``; other values unchanged.

    >>> x = torch.arange(6).reshape(3, 2)
    >>> resize_batch((x, 5), 5)[0][:, 0].tolist(), resize_batch({"x": x}, 2)["x"].shape
    ([0, 2, 4, 0, 2], torch.Size([2, 2]))
    """
    n = _batch_of(inputs)
    if n is None or n < 1:
        raise BenchError("cannot find the batch dimension: no input tensor has a non-empty dim 0")

    def fit(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
            return t
        if batch_size <= n:
            return t[:batch_size].clone()
        reps = (math.ceil(batch_size / n),) + (1,) * (t.dim() - 1)
        return t.repeat(*reps)[:batch_size].contiguous()

    if isinstance(inputs, Mapping):
        return {k: fit(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fit(v) for v in inputs)
    return fit(inputs)


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class VariantResult:
    """One variant at the benchmark's batch size. ``latency`` is in seconds; ``speedup`` compares with the
    baseline variant round by round (``speedup.speedup > 1``: this variant is faster)."""

    name: str
    latency: TimingStats
    speedup: RatioStats
    batch_size: int
    first_call_s: float

    @property
    def throughput_per_s(self) -> float:
        return self.batch_size / self.latency.p50 if self.latency.p50 > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """One entry of the schema's ``variants`` list (report/schema.py, kind 'bench')."""
        lat = self.latency
        return {
            "name": self.name,
            "latency_ms": {
                "p50": lat.p50 * 1e3,
                "p90": lat.p90 * 1e3,
                "p99": lat.p99 * 1e3,
                "mean": lat.mean * 1e3,
                "min": lat.min * 1e3,
                "max": lat.max * 1e3,
                "iqr": lat.iqr * 1e3,
            },
            "rounds": lat.rounds,
            "throughput_per_s": self.throughput_per_s,
            "speedup_vs_baseline": self.speedup.speedup,
            "speedup_iqr": self.speedup.iqr,
            "speedup_q1": self.speedup.q1,
            "speedup_q3": self.speedup.q3,
            "converged": lat.converged,
            "first_call_ms": self.first_call_s * 1e3,
        }


@dataclass(frozen=True)
class SweepPoint:
    variant: str
    batch_size: int
    latency: TimingStats
    within_ceiling: bool = True

    @property
    def throughput_per_s(self) -> float:
        return self.batch_size / self.latency.p50 if self.latency.p50 > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "batch_size": self.batch_size,
            "throughput_per_s": self.throughput_per_s,
            "latency_p50_ms": self.latency.p50 * 1e3,
            "latency_p90_ms": self.latency.p90 * 1e3,
            "latency_iqr_ms": self.latency.iqr * 1e3,
            "rounds": self.latency.rounds,
            "within_ceiling": self.within_ceiling,
        }


@dataclass
class BenchResult:
    """What :func:`bench` measured; :meth:`to_results` is the ``'bench'`` results dict (report/schema.py)."""

    model: str
    batch_size: int
    threads: int
    device: str
    baseline: str
    variants: list[VariantResult]
    rounds: int
    converged: bool
    target_iqr: float
    warmup: int
    elapsed_s: float
    sweep: list[SweepPoint] = field(default_factory=list)
    sweep_stopped: dict[str, str] = field(default_factory=dict)  # variant -> why its sweep stopped

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; measured: {', '.join(v.name for v in self.variants)}")

    @property
    def winner(self) -> str:
        """The variant with the highest median per-round speedup over the baseline."""
        return max(self.variants, key=lambda v: v.speedup.speedup).name

    def sweep_stopped_text(self) -> str | None:
        reasons = list(dict.fromkeys(self.sweep_stopped.values()))
        if not reasons:
            return None
        if len(reasons) == 1:
            return reasons[0]
        return "; ".join(f"{name}: {why}" for name, why in self.sweep_stopped.items())

    def to_results(self) -> dict[str, Any]:
        """The results dict for a ``'bench'`` run (see torchkiln.report.schema)."""
        out: dict[str, Any] = {
            "model": self.model,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "device": self.device,
            "baseline": self.baseline,
            "variants": [v.to_dict() for v in self.variants],
            "winner": self.winner,
            "rounds": self.rounds,
            "converged": self.converged,
            "target_iqr": self.target_iqr,
            "warmup": self.warmup,
            "elapsed_s": self.elapsed_s,
        }
        if self.sweep or self.sweep_stopped:
            out["sweep"] = [p.to_dict() for p in self.sweep]
            out["sweep_stopped"] = self.sweep_stopped_text()
            out["sweep_stopped_by_variant"] = dict(self.sweep_stopped)
        return out


# ---------------------------------------------------------------------------------------------- bench


@contextlib.contextmanager
def _no_silent_recompile_fallback(active: bool, batch_sizes: int) -> Iterator[None]:
    """While compiled variants run: allow one compile per batch size, and fail loudly instead of
    falling back to eager when the recompile limit is hit (dynamo's default is a silent fallback)."""
    if not active:
        yield
        return
    import torch._dynamo.config as dynamo_config

    settings: dict[str, Any] = {}
    if hasattr(dynamo_config, "recompile_limit"):
        settings["recompile_limit"] = max(dynamo_config.recompile_limit, batch_sizes + 8)
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        settings["fail_on_recompile_limit_hit"] = True
    with dynamo_config.patch(**settings):
        yield


def _sweep_sizes(max_batch_size: int) -> list[int]:
    sizes, n = [], 1
    while n <= max_batch_size:
        sizes.append(n)
        n *= 2
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sweep_variant(
    prepared: PreparedVariant,
    input_fn: Callable[[int], Any],
    sizes: list[int],
    *,
    latency_ceiling_ms: float | None,
    target_iqr: float,
    time_s: float,
    sync: Callable[[], None] | None,
) -> tuple[list[SweepPoint], str]:
    points: list[SweepPoint] = []
    for bs in sizes:
        out_of_memory = False
        try:
            call = prepared.bind(prepared.prepare_inputs(input_fn(bs)))
            stats = time_fn(
                call,
                warmup=2,
                min_rounds=3,
                max_rounds=200,
                target_iqr=target_iqr,
                max_time_s=time_s,
                sync=sync,
            )
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True  # free memory below, once the traceback (and its tensors) are gone
        finally:
            call = None  # drop this size's inputs before the next one
        if out_of_memory:
            _free_device_memory(prepared.device)
            return points, f"out of memory at batch {bs}"
        p50_ms = stats.p50 * 1e3
        within = latency_ceiling_ms is None or p50_ms <= latency_ceiling_ms
        points.append(SweepPoint(prepared.name, bs, stats, within))
        if not within:
            return points, f"latency ceiling {latency_ceiling_ms:g} ms at batch {bs} (p50 {p50_ms:.3g} ms)"
    return points, f"max batch {sizes[-1]}"


def bench(
    model: nn.Module,
    inputs: Any = None,
    *,
    variants: Sequence[str] = ("fp32",),
    baseline: str | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    device: str | torch.device | None = None,
    warmup: int = 5,
    min_warmup_s: float = 0.2,
    min_rounds: int = 10,
    max_rounds: int = 100_000,
    min_time_s: float = 1.0,
    target_iqr: float = 0.05,
    max_time_s: float = 10.0,
    sweep: bool = False,
    max_batch_size: int = 1024,
    latency_ceiling_ms: float | None = None,
    sweep_time_s: float = 1.0,
    name: str | None = None,
) -> BenchResult:
    """Benchmark inference of ``model`` under each of ``variants`` (names from
    :func:`torchkiln.measure.variants.list_variants`, composable with ``+``).

    ``inputs``: a tensor, a tuple/list (positional arguments) or a dict (keyword arguments), or a
    callable ``input_fn(batch_size)`` returning such inputs; when None, ``model.example_inputs`` is used
    (torchkiln zoo models have it). ``batch_size`` defaults to dim 0 of the given inputs (32 with an
    ``input_fn``); given tensors are tiled or cut to another batch size along dim 0.

    All variants are timed together in round-robin rounds (see :func:`interleaved_compare`): after a
    first call and at least ``warmup`` rounds / ``min_warmup_s`` seconds of warm-up, rounds repeat until
    IQR/median of every variant's times and ratios is under ``target_iqr`` (but for at least
    ``min_rounds`` rounds and ``min(min_time_s, max_time_s)`` seconds), or ``max_rounds`` or
    ``max_time_s`` is reached. Each variant gets latency percentiles and a speedup over ``baseline``
    (default: the first variant) as the median of per-round ratios with their IQR.
    ``threads`` sets ``torch.set_num_threads`` for the run (default 1
    on CPU, unchanged on CUDA) and is recorded. With ``sweep=True`` each variant is then timed alone at
    batch 1, 2, 4, ... up to ``max_batch_size`` (``sweep_time_s`` per point), stopping at out-of-memory or
    at the first batch whose p50 exceeds ``latency_ceiling_ms``; why it stopped is recorded.

    The model is put in eval mode for the run and its mode restored afterwards; it is not otherwise
    changed. Every requirement of every variant is checked before anything is timed.
    """
    variant_names = [str(v) for v in variants]
    if not variant_names:
        raise BenchError("bench: give at least one variant, e.g. variants=('fp32',)")
    specs: list[VariantSpec] = [get_variant(v) for v in variant_names]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchError(f"bench: variant(s) {', '.join(duplicates)} given more than once")
    baseline = names[0] if baseline is None else get_variant(baseline).name
    if baseline not in names:
        raise BenchError(f"bench: baseline {baseline!r} is not among the variants {', '.join(names)}")
    if max_batch_size < 1:
        raise BenchError(f"bench: max_batch_size must be >= 1, got {max_batch_size}")
    if latency_ceiling_ms is not None and latency_ceiling_ms <= 0:
        raise BenchError(f"bench: latency_ceiling_ms must be positive, got {latency_ceiling_ms}")

    dev = torch.device(device) if device is not None else model_device(model)
    where = model_device(model)
    if where.type != dev.type or (dev.index is not None and where.index not in (None, dev.index)):
        raise BenchError(
            f"bench: the model is on {where} but device={dev}; move it with model.to({str(dev)!r})"
        )

    input_fn, batch_size = _resolve_inputs(model, inputs, batch_size)
    if threads is None and dev.type == "cpu":
        threads = 1
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    uses_compile = any(isinstance(p, Compile) for s in specs for p in s.parts)
    sizes = _sweep_sizes(max_batch_size) if sweep else []

    was_training = model.training
    model.eval()
    try:
        with set_threads(threads) as effective, _no_silent_recompile_fallback(uses_compile, len(sizes) + 1):
            sample = input_fn(batch_size)
            prepared = [apply_variant(s, model, device=dev, example_inputs=sample) for s in specs]
            calls = {p.name: p.bind(p.prepare_inputs(sample)) for p in prepared}
            comparison = interleaved_compare(
                calls,
                baseline=baseline,
                warmup=warmup,
                min_warmup_s=min_warmup_s,
                min_rounds=min_rounds,
                max_rounds=max_rounds,
                min_time_s=min(min_time_s, max_time_s),
                target_iqr=target_iqr,
                max_time_s=max_time_s,
                sync=sync,
            )
            del calls, sample
            points: list[SweepPoint] = []
            stopped: dict[str, str] = {}
            for p in prepared if sweep else []:
                found, why = _sweep_variant(
                    p,
                    input_fn,
                    sizes,
                    latency_ceiling_ms=latency_ceiling_ms,
                    target_iqr=target_iqr,
                    time_s=sweep_time_s,
                    sync=sync,
                )
                points += found
                stopped[p.name] = why
    finally:
        model.train(was_training)

    results = [
        VariantResult(
            name=n,
            latency=comparison.timings[n],
            speedup=comparison.ratios[n],
            batch_size=batch_size,
            first_call_s=comparison.first_call_s[n],
        )
        for n in names
    ]
    return BenchResult(
        model=name or type(model).__name__,
        batch_size=batch_size,
        threads=effective,
        device=str(dev),
        baseline=baseline,
        variants=results,
        rounds=comparison.rounds,
        converged=comparison.converged,
        target_iqr=target_iqr,
        warmup=comparison.warmup,
        elapsed_s=comparison.elapsed_s,
        sweep=points,
        sweep_stopped=stopped,
    )


def _resolve_inputs(
    model: nn.Module, inputs: Any, batch_size: int | None
) -> tuple[Callable[[int], Any], int]:
    """``(input_fn, batch_size)`` from what the caller gave."""
    if batch_size is not None and batch_size < 1:
        raise BenchError(f"bench: batch_size must be >= 1, got {batch_size}")
    if inputs is None:
        example = getattr(model, "example_inputs", None)
        if not callable(example):
            raise BenchError(
                f"bench: no inputs given and {type(model).__name__} has no example_inputs(batch_size); "
                "pass inputs (a tensor, tuple or dict) or input_fn(batch_size)"
            )
        return example, batch_size or 32
    if callable(inputs) and not isinstance(inputs, (torch.Tensor, nn.Module)):
        return inputs, batch_size or 32
    n = _batch_of(inputs)
    if n is None:
        raise BenchError(
            "bench: cannot tell the batch size of the inputs (no tensor with a batch dimension); "
            "pass input_fn(batch_size) instead"
        )
    given = inputs

    def input_fn(bs: int) -> Any:
        return given if bs == n else resize_batch(given, bs)

    return input_fn, batch_size or n
