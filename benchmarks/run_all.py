"""Run every benchmark, one subprocess at a time, and rewrite ``benchmarks/RESULTS.md``.

    python -m benchmarks.run_all                 # full size, every benchmark, rewrites RESULTS.md
    python -m benchmarks.run_all --quick         # quick sizes; prints the table (writes only with --output)
    python -m benchmarks.run_all --only train_precision,train_mfu   # rerun some, keep the other rows
    python -m benchmarks.run_all --list          # what would run

Adding a benchmark = dropping a file in ``benchmarks/``. A module ``benchmarks/<name>.py`` (name not
starting with ``_``) is a benchmark when it defines, at top level:

* ``BENCH = "<name>"`` -- a string literal, the name shown in the results;
* ``def main(argv=None)`` -- runs it: accepts ``--quick`` and ``--threads N`` and prints exactly one JSON
  line as the last line of stdout (``benchmarks._common.run_benchmark`` does all of that);
* optionally ``THREADS = (1, 2)`` -- the thread counts to run it at (default ``(1,)``); each count runs in
  its own process (inductor bakes the thread count into compiled code).

Discovery reads the files' syntax tree (``ast``), so nothing is imported here and a broken benchmark
cannot break discovery. Each run is a subprocess ``python -m benchmarks.<name> --threads N [--quick]``
with a timeout; its stderr streams through, its stdout's last line is parsed as JSON. A benchmark that
crashes, times out or prints no JSON gets a FAILED row with the reason -- the others still run.

The JSON line (see ``benchmarks/_common.py``): ``bench``, ``key`` (the headline figure's name), that
figure's value under its name, ``target`` (``">= 0.98"``, ``"<= 0.5"`` or null for informational
figures), ``met`` (true/false, null when nothing has a target), ``spread`` (min/q1/median/q3/max/n of
the per-pair ratios or per-round values), ``rounds``, ``threads``, ``torch``, ``cpu``, ``quick``,
``note`` (what was measured, and what was tried when short) and ``figures``: every reported figure as
``{key, value, target, met, spread, rounds, note, unit}``. RESULTS.md gets one row per figure.
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import _fmt, format_spread

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
DEFAULT_TIMEOUT_S = 900


@dataclass
class Bench:
    module: str  # benchmarks.<module>
    name: str  # BENCH
    threads: tuple[int, ...] = (1,)
    doc: str = ""
    path: Path = field(default_factory=Path)


def discover(directory: Path = HERE) -> list[Bench]:
    """Every ``*.py`` in ``directory`` that defines ``BENCH = "..."`` and ``main`` at top level, by name."""
    found = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_") or path.stem == "run_all":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError):
            print(f"run_all: cannot parse {path.name}; skipped", file=sys.stderr)
            continue
        name, threads, has_main = None, (1,), False
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                has_main = True
            targets: list[ast.expr] = []
            value = None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for target in targets:
                if not isinstance(target, ast.Name):
                    continue
                try:
                    literal = ast.literal_eval(value)
                except ValueError:
                    continue
                if target.id == "BENCH" and isinstance(literal, str):
                    name = literal
                elif target.id == "THREADS" and isinstance(literal, (tuple, list)) and literal:
                    threads = tuple(int(n) for n in literal)
        if name and has_main:
            found.append(Bench(path.stem, name, threads, ast.get_docstring(tree) or "", path))
    return found


# ---------------------------------------------------------------------------------------------------- running


def _tee(stream: Any, tail: collections.deque) -> None:
    for line in iter(stream.readline, ""):
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line.rstrip("\n"))
    stream.close()


def parse_last_json(stdout: str) -> dict[str, Any] | None:
    """The last non-empty line of ``stdout`` as a JSON object, or None.

    >>> parse_last_json('noise\\n{"bench": "x", "met": true}\\n\\n')
    {'bench': 'x', 'met': True}
    >>> parse_last_json("Traceback ...") is None
    True
    """
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _failure(
    bench: Bench, threads: int, quick: bool, error: str, wall: float, tail: list[str]
) -> dict[str, Any]:
    last = next((line for line in reversed(tail) if line.strip()), "")
    return {
        "bench": bench.name,
        "threads": threads,
        "failed": True,
        "met": False,
        "error": f"{error}: {last}" if last else error,
        "wall_s": wall,
        "quick": quick,
        "stderr_tail": tail,
        "measured_at": _now(),
    }


def run_one(bench: Bench, threads: int, quick: bool, timeout_s: float) -> dict[str, Any]:
    """Run one benchmark at one thread count in a subprocess; a result dict, or a failure record."""
    cmd = [sys.executable, "-m", f"benchmarks.{bench.module}", "--threads", str(threads)]
    if quick:
        cmd.append("--quick")
    print(f"\n### run_all: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    env.pop("TTY_COMPATIBLE", None)
    start = time.perf_counter()
    tail: collections.deque = collections.deque(maxlen=15)
    out_chunks: list[str] = []
    try:
        # A session of its own, so a timeout can end the benchmark and any workers it started (inductor).
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as exc:
        return _failure(bench, threads, quick, f"could not start: {exc}", 0.0, [])
    tee = threading.Thread(target=_tee, args=(proc.stderr, tail), daemon=True)
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    tee.start()
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
        error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()
        error = f"timed out after {timeout_s:.0f} s"
    reader.join(timeout=10)
    tee.join(timeout=10)
    stdout = "".join(out_chunks)
    wall = time.perf_counter() - start
    result = parse_last_json(stdout or "")
    if result is None and error is None:
        error = "no JSON line at the end of stdout"
    if error is not None:
        return _failure(bench, threads, quick, error, wall, list(tail))
    result.setdefault("bench", bench.name)
    result["wall_s_total"] = wall
    result["measured_at"] = _now()
    return result


# ---------------------------------------------------------------------------------------------------- report


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(f: dict[str, Any]) -> str:
    value = f.get("value")
    text = _fmt(value) if value is not None else "n/a"
    return f"{text} {f['unit']}" if f.get("unit") and value is not None else text


def _met(f: dict[str, Any]) -> str:
    if f.get("met") is None:
        return "info" if f.get("target") is None else "n/a"
    return "met" if f["met"] else "**SHORT**"


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per figure: benchmark, threads, figure, value, target, met/SHORT, spread, notes."""
    rows = []
    for r in results:
        bench, threads = r.get("bench", "?"), str(r.get("threads", "?"))
        if r.get("failed"):
            rows.append(
                [
                    bench,
                    threads,
                    r.get("key", "-"),
                    "-",
                    r.get("target") or "-",
                    "**FAILED**",
                    "",
                    _cell(r.get("error", "failed")),
                ]
            )
            continue
        figures = r.get("figures") or [
            {
                "key": r.get("key"),
                "value": r.get(r.get("key", ""), None),
                "target": r.get("target"),
                "met": r.get("met"),
                "spread": r.get("spread") or {},
                "note": r.get("note", ""),
            }
        ]
        for i, f in enumerate(figures):
            key = f"**{f['key']}**" if i == 0 else f["key"]
            rows.append(
                [
                    bench,
                    threads,
                    key,
                    _value(f),
                    f.get("target") or "-",
                    _met(f),
                    format_spread(f.get("spread") or {}),
                    _cell(f.get("note", "")),
                ]
            )
    return rows


def machine_lines() -> list[str]:
    import torch

    from torchkiln.measure import collect_env

    env = collect_env()
    cpu = env["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    return [
        f"- CPU: {cpu['model']} ({cpu['machine']}), {cpu['logical_cores']} logical / "
        f"{cpu['physical_cores']} physical cores, capability {cpu['capability']}",
        f"- CPU flags: {flags}",
        f"- torch {torch.__version__} (mkldnn {cpu['mkldnn']}, mkldnn bf16 {cpu['mkldnn_bf16']}), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
        "- threads: the `threads` column is `torch.set_num_threads` for that row; 1 thread is the headline "
        "(2-thread eager stalls when a neighbour takes a core, see BENCHMARKING.md)",
    ]


def _other_machines(results: list[dict[str, Any]]) -> list[str]:
    """A warning line when kept rows were measured on other CPUs than this one (``--only`` reruns)."""
    from torchkiln.measure.env import cpu_model_name

    here = cpu_model_name()
    others = sorted({str(r["cpu"]) for r in results if r.get("cpu") and r.get("cpu") != here})
    if not others:
        return []
    names = sorted({str(r.get("bench")) for r in results if r.get("cpu") in others})
    return [
        f"- **mixed machines**: {', '.join(names)} were measured on {', '.join(others)} (kept from an "
        "earlier run; each run's CPU is in the summary below); ratios compare within one run only"
    ]


def render(results: list[dict[str, Any]], *, quick: bool, started: dt.datetime, wall_s: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python -m benchmarks.run_all{' --quick' if quick else ''}` (`make bench`) on "
        f"{started.strftime('%Y-%m-%d %H:%M UTC')} in {wall_s / 60:.1f} min"
        f"{' -- QUICK sizes, not the reference figures' if quick else ''}; each run's own date is in the "
        "summary below. Do not edit by hand: rerun it.",
        "How each figure is measured is in the docstring of `benchmarks/<benchmark>.py`; the rules "
        "(interleaved ratios in one process, warm-up, fixed threads, like with like) are in BENCHMARKING.md.",
        "",
        "## Machine",
        "",
        *machine_lines(),
        *_other_machines(results),
        "- shared and noisy: ratios are medians of interleaved A/B pairs; spread = min..max of the "
        "per-pair ratios (or per-round values), IQR and count",
        "",
        "## Figures",
        "",
        "`met`: the figure meets its target; **SHORT**: it does not (kept, with what was tried in the "
        "notes); `info`: no target. The first (bold) figure of each benchmark is its headline.",
        "",
        "| benchmark | threads | figure | value | target | met | spread (min..max, IQR, n) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(results):
        lines.append("| " + " | ".join(_cell(c) if i < 7 else c for i, c in enumerate(row)) + " |")
    lines += ["", "## Summary per run", ""]
    for r in results:
        status = "FAILED" if r.get("failed") else {True: "met", False: "SHORT", None: "info"}[r.get("met")]
        text = r.get("error") if r.get("failed") else r.get("note", "")
        wall = r.get("wall_s_total", r.get("wall_s"))
        wall_text = f", {wall:.0f} s" if isinstance(wall, (int, float)) else ""
        if r.get("measured_at"):
            wall_text += f", {r['measured_at']}"
        if r.get("cpu"):
            wall_text += f", {r['cpu']}"
        lines.append(
            f"- **{r.get('bench')}** ({r.get('threads')} thread(s){wall_text}): {status}. {_cell(text)}"
        )
    lines += ["", "<details><summary>Raw JSON lines</summary>", "", "```json"]
    for r in results:
        slim = {k: v for k, v in r.items() if k != "stderr_tail"}
        lines.append(json.dumps(slim, sort_keys=False))
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)


def load_previous(path: Path) -> list[dict[str, Any]]:
    """The results recorded in an earlier RESULTS.md (its raw JSON block); [] when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    start = text.find("```json\n")
    end = text.find("```", start + 8) if start >= 0 else -1
    if start < 0 or end < 0:
        return []
    found = []
    for line in text[start + 8 : end].splitlines():
        value = parse_last_json(line)
        if value is not None and "bench" in value:
            found.append(value)
    return found


def merge(
    previous: list[dict[str, Any]], new: list[dict[str, Any]], order: list[str]
) -> list[dict[str, Any]]:
    """``new`` replaces every entry of the benchmarks it covers; the other benchmarks' entries stay."""
    covered = {r.get("bench") for r in new}
    kept = [r for r in previous if r.get("bench") not in covered]
    rank = {name: i for i, name in enumerate(order)}

    def key(r: dict[str, Any]) -> tuple[int, str, int]:
        threads = r.get("threads")
        return (
            rank.get(r.get("bench"), len(rank)),
            str(r.get("bench")),
            threads if isinstance(threads, int) else 0,
        )

    return sorted(kept + new, key=key)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark and rewrite benchmarks/RESULTS.md.")
    parser.add_argument(
        "--quick", action="store_true", help="quick sizes (RESULTS.md untouched unless --output)"
    )
    parser.add_argument("--only", default="", help="comma-separated benchmark or module names")
    parser.add_argument(
        "--threads",
        default="",
        help="comma-separated thread counts for every benchmark (default: each benchmark's THREADS)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"markdown file to write (default {RESULTS.name} for full runs, none for --quick)",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per run")
    parser.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="with --only: write only the runs made now (default: keep the output file's other rows)",
    )
    args = parser.parse_args(argv)

    benches = discover()
    order = [b.name for b in benches]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = wanted - {b.name for b in benches} - {b.module for b in benches}
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; found {[b.name for b in benches]}")
        benches = [b for b in benches if b.name in wanted or b.module in wanted]
    if args.list:
        for b in benches:
            first = b.doc.splitlines()[0] if b.doc else ""
            print(f"{b.name:24s} threads={','.join(map(str, b.threads)):6s} {first}")
        return 0
    thread_override = tuple(int(t) for t in args.threads.split(",") if t.strip()) if args.threads else None

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    results = []
    for bench in benches:
        for n in thread_override or bench.threads:
            try:
                results.append(run_one(bench, n, args.quick, args.timeout))
            except Exception as exc:  # noqa: BLE001 - one benchmark must not stop the others
                results.append(_failure(bench, n, args.quick, f"run_all error: {exc!r}", 0.0, []))
    wall = time.perf_counter() - t0
    output = Path(args.output) if args.output else (None if args.quick else RESULTS)
    shown = results
    if args.only and output is not None and not args.no_merge:
        shown = merge(load_previous(output), results, order)
    text = render(shown, quick=args.quick, started=started, wall_s=wall)
    if output is not None:
        output.write_text(text, encoding="utf-8")
        print(f"\nrun_all: wrote {output} ({len(results)} runs, {wall / 60:.1f} min)", file=sys.stderr)
    else:
        print(text, file=sys.stderr)
    failed = [r for r in results if r.get("failed")]
    summary = {
        "bench": "run_all",
        "runs": len(results),
        "failed": len(failed),
        "short": sum(1 for r in results if r.get("met") is False and not r.get("failed")),
        "quick": args.quick,
        "wall_s": round(wall, 1),
        "output": str(output) if output else None,
    }
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
