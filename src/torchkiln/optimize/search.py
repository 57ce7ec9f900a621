"""``tk.optimize``: build every candidate, measure it against fp32 eager (interleaved timing at the batch
size, the evaluator's accuracy, the saved artifact's size), keep the Pareto front, choose the best within
the accuracy budget, save it as a servable artifact plus a recipe fragment, and record the run.

Finished candidates are cached, keyed by the model's hash (weights, input shape, batch size, threads,
torch version, evaluator) and the candidate key, in the history database when one is given (else in
``<out_dir>/optimize-cache.json``), so an interrupted search resumes without measuring them again.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
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
    latency_p90_ms: float | None = None
    mean_ms: float | None = None
    throughput_gain: float | None = None
    rounds: int | None = None
    timing: str | None = None
    accuracy: float | None = None
    accuracy_delta: float | None = None
    size_bytes: int | None = None
    memory_bytes: int | None = None
    memory_source: str | None = None
    within_budget: bool | None = None
    build_s: float | None = None
    first_call_s: float | None = None
    cached: bool = False

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], **changes: Any) -> CandidateResult:
        """A result from its cached dict (keys a newer or older version wrote and this one lacks are
        dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in entry.items() if k in names}, **changes})

    def to_variant(self, batch_size: int) -> dict[str, Any]:
        """The report's bench-shaped variant dict (torchkiln.report.schema)."""
        p50 = self.latency_ms
        return {
            "name": self.key,
            "latency_ms": {"p50": p50} if p50 is not None else {},
            "rounds": self.rounds,
            # the sustained rate (mean call time) where measured, else the median's
            "throughput_per_s": batch_size / ((self.mean_ms or p50) / 1e3) if (self.mean_ms or p50) else None,
            "throughput_gain": self.throughput_gain,
            "size_bytes": self.size_bytes,
            "memory_bytes": self.memory_bytes,
            "peak_memory_bytes": self.memory_bytes,
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
        memory = (
            f", memory {c.memory_bytes / b.memory_bytes:.2f}x" if c.memory_bytes and b.memory_bytes else ""
        )
        if self.objective == "throughput" and c.throughput_gain is not None:
            head = f"{c.throughput_gain:.2f}x the sustained throughput of fp32 eager"
        else:
            head = f"{c.speedup:.2f}x faster than fp32 eager"
        return (
            f"chosen: {c.key} -- {head} at batch {self.batch_size}, "
            f"accuracy {100 * (c.accuracy_delta or 0.0):+.2f} pt{size}{memory}"
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


class _Cache:
    """Finished candidates of one search (one model hash): in the history database (table ``cache``,
    namespace ``optimize:<hash>``) when a history is given, else in ``<out_dir>/optimize-cache.json``.
    Each entry is written as soon as its candidate finishes, so an interrupted search resumes there."""

    def __init__(self, mhash: str, history: Any, json_path: Path, fresh: bool) -> None:
        self.namespace = f"optimize:{mhash}"
        self.history = history
        self.json_path = json_path
        self.where = f"{history.path} (cache {self.namespace})" if history is not None else str(json_path)
        if history is not None:
            if fresh:
                history.cache_clear(self.namespace)
            self.entries: dict[str, Any] = history.cache_get(self.namespace)
            self._all: dict[str, Any] = {}
        else:
            self._all = {} if fresh else _load_json(json_path)
            self.entries = self._all.setdefault(mhash, {})

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry
        if self.history is not None:
            self.history.cache_put(self.namespace, key, entry)
        else:
            tmp = self.json_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._all, indent=1, default=str))
            tmp.replace(self.json_path)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
    fresh: bool = False,
) -> OptimizeResult:
    """Search ways to run ``model`` faster (or smaller) within ``accuracy_budget`` of its accuracy.

    ``example_inputs``: one input tensor (any batch; resized to ``batch_size``). ``evaluator(run) ->
    float``: higher is better, ``run(x)`` the candidate's callable on a batch (see
    :func:`accuracy_evaluator`, :func:`agreement_evaluator`). ``accuracy_budget``: the largest absolute
    drop accepted (0.01 = one point of accuracy). ``objective``: ``"latency"`` (the median call time at
    ``batch_size``, against the baseline's in the same interleaved rounds), ``"throughput"`` (the
    sustained rate: mean call time, so stalls and slow rounds count), ``"size"`` (the saved artifact) or
    ``"memory"`` (resident weights plus the peak working memory of one call).
    ``candidates``: default :func:`generate_candidates`. ``train_data``:
    a Dataset of ``(x, y)`` for static-int8 calibration and the pruning fine-tune. ``time_budget_s``: no
    new candidate starts once it is spent. ``history``: a :class:`~torchkiln.report.history.History`
    (records an ``optimize`` run and holds the cache of finished candidates). ``out_dir``: the chosen
    artifact, the recipe fragment, the report, and the cache when there is no history (a temporary
    directory when None). ``fresh``: forget this model's cached candidates and measure them all again.
    ``measure_s``: seconds of interleaved timing per
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
    cache = _Cache(mhash, history, out / "optimize-cache.json", fresh)
    timing = "quick" if quick else "full"

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
        entry_key = _entry_key(cand, ctx)
        entry = cache.entries.get(entry_key)
        if entry is not None and (quick or entry.get("timing") != "quick"):
            res = CandidateResult.from_entry(entry, cached=True)
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
            res.timing = timing
            # Saved at once, so an interrupted search resumes after the last finished candidate. A failure
            # is not cached: it may be transient (a busy machine, a fixed bug) and is tried again.
            if res.status != "failed":
                cache.put(entry_key, {k: v for k, v in asdict(res).items() if k != "cached"})
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
    front = [p["key"] for p in pareto_front(points, objective)]
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


def _entry_key(cand: Candidate, ctx: BuildContext) -> str:
    """The cache key: the candidate's, plus the fine-tune length for pruned ones (it changes them)."""
    if cand.prune:
        return f"{cand.key}@distill{ctx.distill_epochs}x{ctx.distill_max_steps}"
    return cand.key


def _memory(built: Any, call: Callable[[], Any], size: int, x: torch.Tensor) -> tuple[int | None, str]:
    """Resident weights plus the peak working memory of one call, and how it was counted. ONNX Runtime
    allocates outside PyTorch's allocator, so its sessions are measured as a fresh process's growth."""
    from torchkiln.measure.memory import call_peak_bytes, onnx_process_peak_bytes

    try:
        if Path(built.artifact).suffix == ".onnx":
            peak = onnx_process_peak_bytes(built.artifact, x, threads=torch.get_num_threads())
            return peak, "ONNX Runtime session: peak RSS growth of a fresh process"
        return size + call_peak_bytes(call), "artifact bytes + allocator peak of one call"
    except Exception as exc:  # noqa: BLE001 - a memory figure is not worth losing the candidate
        return None, f"not measured: {_short(exc)}"


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
    base_t, cand_t = cmp.timings["baseline"], cmp.timings["candidate"]
    base_ms = base_t.p50 * 1e3
    speedup = 1.0 if cand == Candidate() else r.speedup
    gain = 1.0 if cand == Candidate() else base_t.mean / cand_t.mean
    size = artifact_size(built.artifact)
    memory, memory_source = _memory(built, call, size, x)
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
        measured_latency_ms=cand_t.p50 * 1e3,
        baseline_latency_ms=base_ms,
        latency_p90_ms=cand_t.p90 * 1e3,
        mean_ms=(base_res.mean_ms if base_res and base_res.mean_ms else base_t.mean * 1e3) / gain,
        throughput_gain=gain,
        rounds=cmp.rounds,
        accuracy=accuracy,
        size_bytes=size,
        memory_bytes=memory,
        memory_source=memory_source,
        build_s=build_s,
        first_call_s=first_s,
    )
