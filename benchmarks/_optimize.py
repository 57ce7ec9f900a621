"""What the ``optimize_*`` benchmarks share: the chosen candidate's figures, its JSON record and the
per-candidate log line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks._common import figure, log, record

DROP_TARGET = "<= 1.0"


def candidate_logger(bench: str, metric: Callable[[Any], str]) -> Callable[[Any], None]:
    """``on_result`` for ``tk.optimize``: a line per finished candidate (``metric(r)`` when measured)."""

    def on_result(r: Any) -> None:
        log(f"[{bench}]   {r.key}: {r.status} " + (metric(r) if r.status == "ok" else r.why[:120]))

    return on_result


def chosen_figures(result: Any, what: str, speedup_target: str) -> list[dict[str, Any]]:
    """speedup / acc_drop_pt / size_ratio of an OptimizeResult's choice (the baseline when none won)."""
    c, b = result.chosen or result.baseline, result.baseline
    spread = {
        "min": c.speedup_min,
        "q1": c.speedup_q1,
        "median": c.speedup,
        "q3": c.speedup_q3,
        "max": c.speedup_max,
        "n": c.rounds,
    }
    return [
        figure(
            "speedup",
            c.speedup,
            speedup_target,
            spread=spread,
            rounds=c.rounds,
            note=f"{c.key} vs fp32 eager, batch {result.batch_size}, interleaved "
            f"({c.measured_latency_ms or 0:.2f} ms vs {c.baseline_latency_ms or 0:.2f} ms)",
        ),
        figure(
            "acc_drop_pt",
            100 * ((b.accuracy or 0) - (c.accuracy or 0)),
            DROP_TARGET,
            unit="pt",
            note=f"{what}: fp32 {100 * (b.accuracy or 0):.2f}%, {c.key} {100 * (c.accuracy or 0):.2f}%",
        ),
        figure(
            "size_ratio",
            (c.size_bytes or 0) / b.size_bytes if b.size_bytes else None,
            note=f"{c.key} artifact {c.size_bytes} B / fp32 state_dict {b.size_bytes} B",
        ),
        figure(
            "candidates",
            float(sum(r.status == "ok" for r in result.candidates)),
            note="measured; skipped: "
            + "; ".join(f"{r.key} ({r.why[:80]})" for r in result.candidates if r.status != "ok"),
        ),
    ]


def optimize_record(
    bench: str, result: Any, figures: list[dict[str, Any]], note: str, **extra: Any
) -> dict[str, Any]:
    """The benchmark's JSON record: the figures, the choice, the front and every candidate's outcome."""
    return record(
        bench,
        figures,
        note=note,
        chosen=result.chosen.key if result.chosen else None,
        front=result.front,
        table={
            r.key: {"status": r.status, "speedup": r.speedup, "accuracy": r.accuracy}
            for r in result.candidates
        },
        **extra,
    )


def objective_figures(result: Any, rerun: Callable[[str], Any]) -> list[dict[str, Any]]:
    """What the same search chooses under the other objectives. ``rerun(objective)`` runs ``tk.optimize``
    again over the same cache, so nothing is measured twice (checked: a rerun that measures is refused)."""
    b = result.baseline
    out = []
    for objective, key, value, of, unit in (
        ("throughput", "throughput_choice_gain", "throughput_gain", None, "x"),
        ("size", "size_choice_ratio", "size_bytes", b.size_bytes, ""),
        ("memory", "memory_choice_ratio", "memory_bytes", b.memory_bytes, ""),
    ):
        again = rerun(objective)
        if again.measured:
            raise RuntimeError(f"the {objective} rerun measured {again.measured} candidate(s) again")
        c = again.chosen or again.baseline
        v = getattr(c, value)
        ratio = v / of if (of and v is not None) else v
        out.append(
            figure(
                key,
                ratio,
                note=f"--objective {objective} chooses {c.key}"
                + ("" if again.chosen else " (nothing beats the baseline)")
                + f": {c.speedup or 0:.2f}x median speedup, accuracy "
                f"{100 * (c.accuracy_delta or 0):+.2f} pt, memory {c.memory_bytes or 0:,} B vs "
                f"{b.memory_bytes or 0:,} B ({c.memory_source or '-'})",
                unit=unit if unit != "x" else "",
            )
        )
    return out
