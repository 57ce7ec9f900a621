"""``tk.optimize``: build every candidate, measure it against fp32 eager (interleaved timing at the batch
size, the evaluator's accuracy, the saved artifact's size), keep the Pareto front, choose the best within
the accuracy budget, save it as a servable artifact plus a recipe fragment, and record the run.

Finished candidates are cached in ``<out_dir>/optimize-cache.json`` keyed by the model's hash (weights,
input shape, batch size, threads, torch version) and the candidate key, so an interrupted search resumes
without measuring them again.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.optimize.artifact import short_error as _short
from torchkiln.optimize.artifact import write_chosen as _write_chosen
from torchkiln.optimize.candidates import (
    BuildContext,
    Candidate,
    CandidateSkipped,
    artifact_size,
    build_candidate,
    generate_candidates,
)
from torchkiln.optimize.pareto import OBJECTIVES, OptimizeError, choose, pareto_front, within_budget

__all__ = [
    "CandidateResult",
    "OptimizeResult",
    "accuracy_evaluator",
    "agreement_evaluator",
    "model_hash",
    "optimize",
]

Evaluator = Callable[[Callable[[torch.Tensor], Any]], float]


# ------------------------------------------------------------------------------------------- evaluators


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _logits(out[0])
    if isinstance(out, Mapping):
        return _logits(out.get("logits", next(iter(out.values()))))
    raise OptimizeError(f"cannot find the output tensor in a {type(out).__name__}")


def _padded_batches(x: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        n = len(xb)
        if n < batch_size:  # pad the last batch: compiled graphs keep one shape
            xb = torch.cat([xb, xb[:1].expand(batch_size - n, *xb.shape[1:])])
        out.append((xb.contiguous(), n))
    return out


def accuracy_evaluator(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> Evaluator:
    """Top-1 accuracy of ``run`` on ``(inputs, labels)``, in batches of exactly ``batch_size`` (the last one
    padded) so compiled candidates see one shape.

    >>> ev = accuracy_evaluator(torch.eye(3), torch.tensor([0, 1, 2]), batch_size=2)
    >>> ev(lambda x: x)
    1.0
    """
    batches = _padded_batches(inputs, batch_size)

    def evaluate(run: Callable[[torch.Tensor], Any]) -> float:
        correct = total = 0
        for (xb, n), start in zip(batches, range(0, len(inputs), batch_size), strict=True):
            pred = _logits(run(xb))[:n].float().argmax(-1)
            expected = labels[start : start + n]
            correct += int((pred == expected).sum())  # per sample, or per position for sequences
            total += expected.numel()
        return correct / max(1, total)

    evaluate.__name__ = f"accuracy({len(inputs)} samples)"
    return evaluate


def agreement_evaluator(reference: nn.Module, inputs: torch.Tensor, batch_size: int = 32) -> Evaluator:
    """Agreement with ``reference``'s own outputs where there are no labels: the fraction of samples whose
    argmax (classifiers, LMs: per position) matches the float model's. 1.0 for the baseline itself."""
    batches = _padded_batches(inputs, batch_size)
    with torch.inference_mode():
        expected = [_logits(reference(xb))[:n].argmax(-1) for xb, n in batches]

    def evaluate(run: Callable[[torch.Tensor], Any]) -> float:
        agree = total = 0
        for (xb, n), exp in zip(batches, expected, strict=True):
            got = _logits(run(xb))[:n].float().argmax(-1)
            agree += int((got == exp).sum())
            total += exp.numel()
        return agree / max(1, total)

    evaluate.__name__ = f"agreement({len(inputs)} samples)"
    return evaluate


# ---------------------------------------------------------------------------------------------- results


@dataclass
class CandidateResult:
    """One candidate's outcome. ``status``: ``"ok"`` (measured), ``"skipped"`` (cannot run here, or its
    branch is already over budget: ``why``), ``"failed"`` (building or running raised: ``why``)."""

    key: str
    candidate: dict[str, Any]
    status: str
    why: str = ""
    speedup: float | None = None
    speedup_q1: float | None = None
    speedup_q3: float | None = None
    speedup_min: float | None = None
    speedup_max: float | None = None
    latency_ms: float | None = None
    measured_latency_ms: float | None = None
    baseline_latency_ms: float | None = None
    rounds: int | None = None
    accuracy: float | None = None
    accuracy_delta: float | None = None
    size_bytes: int | None = None
    within_budget: bool | None = None
    build_s: float | None = None
    first_call_s: float | None = None
    cached: bool = False

    def to_variant(self, batch_size: int) -> dict[str, Any]:
        """The report's bench-shaped variant dict (torchkiln.report.schema)."""
        p50 = self.latency_ms
        return {
            "name": self.key,
            "latency_ms": {"p50": p50} if p50 is not None else {},
            "rounds": self.rounds,
            "throughput_per_s": batch_size / (p50 / 1e3) if p50 else None,
            "size_bytes": self.size_bytes,
            "accuracy": self.accuracy,
            "speedup_vs_baseline": self.speedup,
            "speedup_iqr": (self.speedup_q3 - self.speedup_q1)
            if self.speedup_q1 is not None and self.speedup_q3 is not None
            else None,
            "within_budget": self.within_budget,
        }


@dataclass
class OptimizeResult:
    """What :func:`optimize` found: every candidate, the front, the choice (None: the baseline stays)."""

    baseline: CandidateResult
    candidates: list[CandidateResult]
    front: list[str]
    chosen: CandidateResult | None
    objective: str
    accuracy_budget: float
    batch_size: int
    threads: int
    model_hash: str
    measured: int
    reused: int
    stopped_early: str | None = None
    artifact: Path | None = None
    artifact_format: str | None = None
    recipe_fragment: Path | None = None
    run_id: str | None = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """One sentence: the choice and what it bought, or that nothing beat the baseline."""
        if self.chosen is None:
            return (
                f"nothing beats the fp32 eager baseline within a {self.accuracy_budget * 100:g}-point "
                f"accuracy budget on {self.objective} (batch {self.batch_size}, {self.threads} "
                "thread(s)); keep the baseline"
            )
        c, b = self.chosen, self.baseline
        size = f", size {c.size_bytes / b.size_bytes:.2f}x" if c.size_bytes and b.size_bytes else ""
        return (
            f"chosen: {c.key} -- {c.speedup:.2f}x faster than fp32 eager at batch {self.batch_size}, "
            f"accuracy {100 * (c.accuracy_delta or 0.0):+.2f} pt{size}"
        )

    def to_results(self) -> dict[str, Any]:
        """The results dict of an ``optimize`` history run (bench-shaped ``variants``; ``chosen``)."""
        ok = [self.baseline] + [c for c in self.candidates if c.status == "ok" and c is not self.baseline]
        return {
            "model_hash": self.model_hash,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "device": "cpu",
            "baseline": self.baseline.key,
            "objective": self.objective,
            "accuracy_budget": self.accuracy_budget,
            "variants": [c.to_variant(self.batch_size) for c in ok],
            "chosen": self.chosen.key if self.chosen else None,
            "winner": self.chosen.key if self.chosen else self.baseline.key,
            "front": list(self.front),
            "candidates": [asdict(c) for c in self.candidates],
            "skipped": {c.key: c.why for c in self.candidates if c.status != "ok"},
            "stopped_early": self.stopped_early,
            "message": self.message,
            "measured": self.measured,
            "reused": self.reused,
            "artifact": str(self.artifact) if self.artifact else None,
            "artifact_format": self.artifact_format,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------- caching


def model_hash(model: nn.Module, example: torch.Tensor, batch_size: int, threads: int, salt: str = "") -> str:
    """A short hash of everything a measurement depends on: weights, input shape/dtype, batch size,
    threads, torch version and ``salt`` (e.g. the evaluator's name)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(
            t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        )
    h.update(
        f"{tuple(example.shape[1:])}|{example.dtype}|{batch_size}|{threads}|{torch.__version__}|{salt}".encode()
    )
    return h.hexdigest()[:16]


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- search


#: seconds of interleaved timing per candidate (quick, full); ``optimize(measure_s=...)`` overrides.
MEASURE_S = (1.0, 4.0)


def _measure(
    built_run: Callable[[], Any],
    baseline_run: Callable[[], Any],
    *,
    quick: bool,
    measure_s: float | None = None,
) -> Any:
    from torchkiln.measure.bench import interleaved_compare

    return interleaved_compare(
        {"baseline": baseline_run, "candidate": built_run},
        baseline="baseline",
        warmup=3,
        min_warmup_s=0.2 if quick else 0.5,
        min_rounds=6 if quick else 15,
        max_time_s=measure_s if measure_s is not None else MEASURE_S[0 if quick else 1],
        target_iqr=0.05,
    )


def optimize(
    model: nn.Module,
    example_inputs: torch.Tensor,
    evaluator: Evaluator,
    *,
    accuracy_budget: float = 0.01,
    objective: str = "latency",
    batch_size: int = 32,
    time_budget_s: float | None = None,
    candidates: Sequence[Candidate] | None = None,
    history: Any = None,
    out_dir: str | Path | None = None,
    train_data: Any = None,
    compile: bool = True,  # noqa: A002 - mirrors torch.compile
    prune_ratios: Sequence[float] = (0.25, 0.5),
    distill_epochs: int = 2,
    distill_max_steps: int | None = None,
    quick: bool = False,
    measure_s: float | None = None,
    name: str = "model",
    on_result: Callable[[CandidateResult], None] | None = None,
    export_chosen: bool = True,
    report: bool = True,
) -> OptimizeResult:
    """Search ways to run ``model`` faster (or smaller) within ``accuracy_budget`` of its accuracy.

    ``example_inputs``: one input tensor (any batch; resized to ``batch_size``). ``evaluator(run) ->
    float``: higher is better, ``run(x)`` the candidate's callable on a batch (see
    :func:`accuracy_evaluator`, :func:`agreement_evaluator`). ``accuracy_budget``: the largest absolute
    drop accepted (0.01 = one point of accuracy). ``objective``: ``"latency"``/``"throughput"`` (both at
    ``batch_size``) or ``"size"``. ``candidates``: default :func:`generate_candidates`. ``train_data``:
    a Dataset of ``(x, y)`` for static-int8 calibration and the pruning fine-tune. ``time_budget_s``: no
    new candidate starts once it is spent. ``history``: a :class:`~torchkiln.report.history.History`
    (records an ``optimize`` run). ``out_dir``: the cache, the chosen artifact, the recipe fragment and
    the report (a temporary directory when None). ``measure_s``: seconds of interleaved timing per
    candidate (default 4, ``quick`` 1). The model is put in eval mode.

    >>> import torchkiln as tk
    >>> model = tk.create_model("mlp", hidden=(16,))
    >>> x = torch.randn(40, 64)
    >>> res = optimize(model, x, agreement_evaluator(model, x, 8), batch_size=8, quick=True,
    ...                candidates=[Candidate(), Candidate(precision="bf16")],
    ...                export_chosen=False, report=False)
    >>> res.baseline.key, res.baseline.accuracy
    ('eager', 1.0)
    """
    from torchkiln.measure.bench import resize_batch

    if objective not in OBJECTIVES:
        raise OptimizeError(f"objective {objective!r} is not accepted; accepted: {', '.join(OBJECTIVES)}")
    if not isinstance(example_inputs, torch.Tensor):
        raise OptimizeError(
            f"example_inputs must be one input tensor (a batch), got {type(example_inputs).__name__}"
        )
    if not 0 <= accuracy_budget < 1:
        raise OptimizeError(f"accuracy_budget must be in [0, 1) (0.01 = 1 point), got {accuracy_budget}")
    if batch_size < 1:
        raise OptimizeError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = resize_batch(example_inputs, batch_size)
    threads = torch.get_num_threads()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="kiln-optimize-"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "candidates"
    work.mkdir(exist_ok=True)
    mhash = model_hash(model, x, batch_size, threads, getattr(evaluator, "__name__", ""))
    cache_path = out / "optimize-cache.json"
    cache = _load_cache(cache_path)
    entries: dict[str, Any] = cache.setdefault(mhash, {})

    todo = (
        list(candidates)
        if candidates is not None
        else generate_candidates(model, x, compile=compile, prune_ratios=prune_ratios)
    )
    base_c = Candidate()
    if base_c not in todo:
        todo.insert(0, base_c)
    else:
        todo.remove(base_c)
        todo.insert(0, base_c)
    ctx = BuildContext(model, x, work, train_data, distill_epochs, distill_max_steps, measure_s=measure_s)
    baseline_built = build_candidate(base_c, ctx)
    baseline_call = baseline_built.bind(x)
    results: list[CandidateResult] = []
    over_budget_prune: float | None = None  # smallest prune ratio already over budget
    failed_parents: dict[float, str] = {}
    measured = reused = 0
    stopped = None
    base_res: CandidateResult | None = None

    for cand in todo:
        key = cand.key
        if key in entries:
            res = CandidateResult(**{**entries[key], "cached": True})
            reused += 1
        elif time_budget_s is not None and time.perf_counter() - start > time_budget_s and cand != base_c:
            stopped = stopped or (
                f"the time budget ({time_budget_s:g} s) ran out after {time.perf_counter() - start:.0f} s; "
                f"{len(todo) - len(results)} candidate(s) not started"
            )
            res = CandidateResult(key, cand.to_dict(), "skipped", "time budget spent before it started")
        elif cand.prune and over_budget_prune is not None and cand.prune > over_budget_prune:
            res = CandidateResult(
                key,
                cand.to_dict(),
                "skipped",
                f"prune {over_budget_prune:g} is already over the accuracy budget; "
                "a larger ratio would be worse",
            )
        elif cand.prune and cand.parent is not None and cand.prune in failed_parents:
            res = CandidateResult(key, cand.to_dict(), "skipped", failed_parents[cand.prune])
        else:
            res = _run_candidate(cand, ctx, baseline_built, baseline_call, evaluator, base_res, x, quick)
            # Saved at once, so an interrupted search resumes after the last finished candidate. A failure
            # is not cached: it may be transient (a busy machine, a fixed bug) and is tried again.
            if res.status != "failed":
                entries[key] = {k: v for k, v in asdict(res).items() if k != "cached"}
                _save_cache(cache_path, cache)
            measured += 1
        if cand == base_c:
            base_res = res
        # budget bookkeeping
        if base_res is not None and res.status == "ok" and res is not base_res:
            res.accuracy_delta = (res.accuracy or 0.0) - (base_res.accuracy or 0.0)
            res.within_budget = within_budget(asdict(res), base_res.accuracy or 0.0, accuracy_budget)
        if cand.prune and cand.parent is None:
            if res.status == "ok" and not res.within_budget:
                over_budget_prune = (
                    cand.prune if over_budget_prune is None else min(over_budget_prune, cand.prune)
                )
                failed_parents[cand.prune] = (
                    f"its float pruned model ({Candidate(prune=cand.prune).key}) is already over "
                    "the accuracy budget"
                )
            elif res.status != "ok":
                failed_parents[cand.prune] = (
                    f"{Candidate(prune=cand.prune).key} could not be built: {res.why}"
                )
        results.append(res)
        if on_result is not None:
            on_result(res)

    assert base_res is not None
    base_res.within_budget = True
    base_res.accuracy_delta = 0.0
    ok = [r for r in results if r.status == "ok"]
    points = [asdict(r) for r in ok]
    front = [p["key"] for p in pareto_front(points)]
    pick = choose(
        points,
        baseline_accuracy=base_res.accuracy or 0.0,
        accuracy_budget=accuracy_budget,
        objective=objective,
        baseline_key=base_res.key,
    )
    chosen = next((r for r in ok if pick is not None and r.key == pick["key"]), None)
    result = OptimizeResult(
        baseline=base_res,
        candidates=results,
        front=front,
        chosen=chosen,
        objective=objective,
        accuracy_budget=accuracy_budget,
        batch_size=batch_size,
        threads=threads,
        model_hash=mhash,
        measured=measured,
        reused=reused,
        stopped_early=stopped,
    )
    if export_chosen:
        _write_chosen(result, ctx, out, name)
    if history is not None:
        result.run_id = history.record(
            "optimize",
            name,
            result.to_results(),
            config={"objective": objective, "accuracy_budget": accuracy_budget, "batch_size": batch_size},
            artifacts={
                k: str(v) for k, v in (("artifact", result.artifact), ("recipe", result.recipe_fragment)) if v
            },
        )
        if report:
            from torchkiln.report.html import render_report

            result.report = render_report(
                [history.get(result.run_id)], out / "report.html", title=f"kiln optimize: {name}"
            )
    elif report:
        from torchkiln.report.history import Run
        from torchkiln.report.html import render_report

        run = Run(
            "optimize-" + mhash,
            "optimize",
            name,
            time.strftime("%Y-%m-%dT%H:%M:%S"),
            results=result.to_results(),
        )
        result.report = render_report([run], out / "report.html", title=f"kiln optimize: {name}")
    return result


def _run_candidate(
    cand: Candidate,
    ctx: BuildContext,
    baseline_built: Any,
    baseline_call: Callable[[], Any],
    evaluator: Evaluator,
    base_res: CandidateResult | None,
    x: torch.Tensor,
    quick: bool,
) -> CandidateResult:
    key = cand.key
    t0 = time.perf_counter()
    try:
        built = baseline_built if cand == Candidate() else build_candidate(cand, ctx)
    except CandidateSkipped as exc:
        return CandidateResult(key, cand.to_dict(), "skipped", str(exc))
    except Exception as exc:  # noqa: BLE001 - one candidate failing must not stop the search
        return CandidateResult(key, cand.to_dict(), "failed", _short(exc))
    build_s = time.perf_counter() - t0
    try:
        call = built.bind(x)
        first = time.perf_counter()
        call()  # compile / first-call cost, outside the timed rounds
        first_s = time.perf_counter() - first
        accuracy = float(evaluator(built.run))
        cmp = _measure(call, baseline_call, quick=quick, measure_s=ctx.measure_s)
    except Exception as exc:  # noqa: BLE001
        return CandidateResult(key, cand.to_dict(), "failed", _short(exc), build_s=build_s)
    r = cmp.ratios["candidate"]
    base_ms = cmp.timings["baseline"].p50 * 1e3
    speedup = 1.0 if cand == Candidate() else r.speedup
    return CandidateResult(
        key,
        cand.to_dict(),
        "ok",
        speedup=speedup,
        speedup_q1=r.q1,
        speedup_q3=r.q3,
        speedup_min=min(r.speedups) if r.speedups else None,
        speedup_max=max(r.speedups) if r.speedups else None,
        latency_ms=(base_res.baseline_latency_ms if base_res and base_res.baseline_latency_ms else base_ms)
        / speedup,
        measured_latency_ms=cmp.timings["candidate"].p50 * 1e3,
        baseline_latency_ms=base_ms,
        rounds=cmp.rounds,
        accuracy=accuracy,
        size_bytes=artifact_size(built.artifact),
        build_s=build_s,
        first_call_s=first_s,
    )
