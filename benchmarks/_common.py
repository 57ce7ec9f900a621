"""Helpers shared by the benchmark scripts: arguments, threads, the machine, figures and the JSON line.

A benchmark module defines ``BENCH`` (its name), optionally ``THREADS`` (the thread counts ``run_all``
runs it at), a ``measure(args) -> dict`` function and ``main(argv=None)`` that calls
:func:`run_benchmark`. ``measure`` returns a record made with :func:`record`; :func:`run_benchmark`
prints the human table to stderr and the JSON line (always the last line of stdout).

While ``measure`` runs, ``sys.stdout`` points at stderr, so nothing a library prints can end up after
(or instead of) the JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INDUCTOR_CACHE = ROOT / ".cache" / "inductor-bench"

# Keys every JSON line carries (tests and run_all rely on them).
REQUIRED_KEYS = (
    "bench",
    "key",
    "target",
    "met",
    "threads",
    "torch",
    "cpu",
    "quick",
    "rounds",
    "spread",
    "figures",
)


def use_private_inductor_cache() -> str:
    """Point inductor at the benchmarks' own cache (call before ``import torch``); return the path.

    Inductor's default cache is shared by every process on the machine (BENCHMARKING.md, traps).
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(INDUCTOR_CACHE)
    INDUCTOR_CACHE.mkdir(parents=True, exist_ok=True)
    return str(INDUCTOR_CACHE)


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(
    description: str | None,
    argv: Sequence[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """``--quick`` and ``--threads N`` (default 1), plus whatever ``add_args`` adds."""
    parser = argparse.ArgumentParser(
        description=(description or "").strip().splitlines()[0] if description else None
    )
    parser.add_argument("--quick", action="store_true", help="small and short (under ~60 s here)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def fix_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` for the whole process; return the count in effect."""
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ machine


def machine() -> dict[str, Any]:
    """The fields every JSON line carries about where it was measured (no host or user names)."""
    import torch

    from torchkiln.measure import cpu_flags, cpu_model_name

    flags = [name for name, present in cpu_flags().items() if present]
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu_model_name(),
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
    }


# ------------------------------------------------------------------------------------------------ figures


def spread_of(values: Sequence[float]) -> dict[str, float | int]:
    """min, q1, median, q3, max and count of ``values`` (per-pair ratios, per-round figures...)."""
    from torchkiln.measure import percentile

    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"n": 0}
    return {
        "min": min(vals),
        "q1": percentile(vals, 25),
        "median": percentile(vals, 50),
        "q3": percentile(vals, 75),
        "max": max(vals),
        "n": len(vals),
    }


def ratio_spread(stats: Any, which: str = "speedups") -> dict[str, Any]:
    """Spread of a :class:`torchkiln.measure.RatioStats`' per-pair ratios.

    ``which="speedups"`` (t_a / t_b) or ``"time_ratios"`` (t_b / t_a).
    """
    if which == "speedups":
        values = list(stats.speedups)
    elif which == "time_ratios":
        values = [tb / ta for ta, tb in zip(stats.times_a, stats.times_b, strict=True) if ta > 0]
    else:
        raise ValueError(f"which must be 'speedups' or 'time_ratios', got {which!r}")
    out = spread_of(values)
    out["converged"] = bool(stats.converged)
    out["warmup_pairs"] = int(stats.warmup)
    return out


def meets(value: float | None, target: str | None) -> bool | None:
    """Whether ``value`` meets ``target`` (``">= 0.98"``, ``"<= 0.5"``); None when there is no target.

    >>> meets(0.99, ">= 0.98"), meets(0.6, "<= 0.5"), meets(1.2, None)
    (True, False, None)
    """
    if target is None:
        return None
    if value is None or not math.isfinite(value):
        return False
    op, _, number = target.strip().partition(" ")
    bound = float(number)
    if op == ">=":
        return value >= bound
    if op == "<=":
        return value <= bound
    if op == ">":
        return value > bound
    if op == "<":
        return value < bound
    raise ValueError(f"target must look like '>= 0.98' or '<= 0.5', got {target!r}")


def figure(
    key: str,
    value: float | None,
    target: str | None = None,
    *,
    spread: dict[str, Any] | None = None,
    rounds: int | None = None,
    note: str = "",
    unit: str = "",
) -> dict[str, Any]:
    """One reported figure. ``target`` None means informational (``met`` is then None)."""
    return {
        "key": key,
        "value": value,
        "target": target,
        "met": meets(value, target),
        "spread": spread or {},
        "rounds": rounds if rounds is not None else (spread or {}).get("n"),
        "note": note,
        "unit": unit,
    }


def record(bench: str, figures: list[dict[str, Any]], *, note: str = "", **extra: Any) -> dict[str, Any]:
    """The JSON line: the first figure is the headline (its key and value at the top level, with its
    target, met, spread and rounds); ``met`` is True only when every figure with a target meets it."""
    if not figures:
        raise ValueError("a benchmark reports at least one figure")
    head = figures[0]
    targeted = [f["met"] for f in figures if f["target"] is not None]
    out: dict[str, Any] = {
        "bench": bench,
        "key": head["key"],
        head["key"]: head["value"],
        "target": head["target"],
        "met": all(targeted) if targeted else None,
        "spread": head["spread"],
        "rounds": head["rounds"],
    }
    for f in figures[1:]:
        out.setdefault(f["key"], f["value"])
    out["figures"] = figures
    out["note"] = note
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------------------ output


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def format_spread(spread: dict[str, Any]) -> str:
    """``"0.97..1.01 (IQR 0.98..1.00, n=12)"`` or ``""``."""
    if not spread or spread.get("n", 0) == 0 or "min" not in spread:
        return ""
    return (
        f"{_fmt(spread['min'])}..{_fmt(spread['max'])} "
        f"(IQR {_fmt(spread['q1'])}..{_fmt(spread['q3'])}, n={spread['n']})"
    )


def print_table(result: dict[str, Any], file: Any = None) -> None:
    """The human summary of a result on stderr."""
    file = file or sys.stderr
    rows = [("figure", "value", "target", "met", "spread (min..max, IQR)")]
    for f in result["figures"]:
        met = "-" if f["met"] is None else ("yes" if f["met"] else "SHORT")
        value = _fmt(f["value"]) + (f" {f['unit']}" if f.get("unit") else "")
        rows.append((f["key"], value, f["target"] or "-", met, format_spread(f["spread"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(
        f"\n== {result['bench']}  (threads={result['threads']}, torch {result['torch']}, "
        f"{result['cpu']}{', quick' if result.get('quick') else ''})",
        file=file,
    )
    for i, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)), file=file)
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths), file=file)
    if result.get("note"):
        print(f"  note: {result['note']}", file=file)
    file.flush()


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None, floats rounded to 6 significant digits."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit(result: dict[str, Any], stream: Any = None) -> None:
    """Print ``result`` as one JSON line (the last line of stdout)."""
    stream = stream or sys.stdout
    stream.write(json.dumps(_clean(result), sort_keys=False) + "\n")
    stream.flush()


def run_benchmark(
    bench: str,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict[str, Any]:
    """Parse arguments, fix threads, run ``measure`` with stdout sent to stderr, print table + JSON line."""
    args = parse_args(description, argv, add_args)
    real_stdout = sys.stdout
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        fix_threads(args.threads)
        result = measure(args)
        result.update({k: v for k, v in machine().items() if k not in result})
        result.setdefault("quick", bool(args.quick))
        result["wall_s"] = time.perf_counter() - start
        print_table(result)
    emit(result, real_stdout)
    return result


# ------------------------------------------------------------------------------------------------ misc


@contextlib.contextmanager
def throwaway_terminal() -> Iterator[None]:
    """Send stdout to /dev/null while telling rich it is a terminal (``TTY_COMPATIBLE=1``), so a rich
    progress bar renders and refreshes exactly as on a real terminal, into nothing."""
    previous = os.environ.get("TTY_COMPATIBLE")
    os.environ["TTY_COMPATIBLE"] = "1"
    try:
        with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        if previous is None:
            os.environ.pop("TTY_COMPATIBLE", None)
        else:
            os.environ["TTY_COMPATIBLE"] = previous


def log(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr, flush=True)
