"""Profile a few training or inference steps: operator and module tables, a bounded Chrome/Perfetto
trace, memory over time, FLOPs per step and MFU.

``profile(model, inputs)`` runs ``torch.profiler`` over ``wait + warmup + active`` steps (CPU activity
always, CUDA activity too when CUDA is available) and keeps the ``active`` ones:

* **operators**: ``key_averages()`` of the active steps -- self and total time, calls (totals over the
  active steps), the input shapes of each operator's most expensive shape group (``record_shapes``);
  ranges the profiler or torchkiln opened (``ProfilerStep#``, ``kiln::*``, ``module::*``,
  ``Optimizer.step#...``) are left out of it.
* **modules**: a forward pre-hook and a forward hook on every submodule open and close a
  ``record_function("module::<qualified name>")`` range; the module table is those ranges' total time
  and calls. They cover forward only (backward runs in the autograd engine, outside the hooks).
* **trace**: ``export_chrome_trace`` of the active steps, rewritten gzipped (open it in
  https://ui.perfetto.dev or chrome://tracing). When the compressed file would exceed ``max_trace_mb``
  the shortest events are dropped first (instant, flow and counter events count as zero length) until it
  fits; the file's ``kiln`` key and the result say how many were dropped.
* **memory**: ``profile_memory=True``; the profiler's ``[memory]`` events (one per allocation or free,
  with its signed byte count) give the timeline: the bytes held at the start of the first active step
  plus the running sum of the events. On CPU the start level is counted from tensor sizes (parameters,
  buffers, gradients, optimizer state, inputs), since the CPU allocator has no total; on CUDA it is
  ``torch.cuda.memory_allocated`` and the peak is ``torch.cuda.max_memory_allocated`` over the active
  steps (the caching allocator's own figure).
* **FLOPs and MFU**: ``FlopCounterMode`` via :func:`count_flops` / :func:`training_step_flops` (forward,
  or forward + backward; a multiply-add is 2 FLOPs; ops without a formula are listed). ``step_ms`` is
  the median of ``active`` steps timed *without* the profiler or the hooks, after profiling, since
  profiling slows each step; MFU = FLOPs per step / step time / the machine's measured GEMM peak for
  the precision's dtype (:func:`peak_flops`, cached).

In ``mode="train"`` a step is forward, loss, backward, optimizer step and ``zero_grad(set_to_none=True)``.
Without an ``optimizer`` the step uses ``SGD(lr=0)`` (a real optimizer step that moves no weight). Either
way profiling leaves the model and the optimizer as it found them: parameters, buffers, gradients,
train/eval flags, optimizer state and the global RNG are saved first and restored afterwards. The loss is
``loss_fn(output)`` or the loss the model returns; logits without a ``loss_fn`` are an error (there are
no targets to compare them with). In ``mode="inference"`` a step is a forward under
``torch.inference_mode()`` with the model in eval mode.

>>> import tempfile
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> x = torch.randn(8, 16)
>>> res = profile(net, x, mode="inference", active=2, out_dir=tempfile.mkdtemp(), peak=None)
>>> any(row["name"] == "aten::addmm" for row in res.op_table), [m["name"] for m in res.module_table][:1]
(True, ['(root)'])
>>> res.flops.total == 2 * 8 * (16 * 32 + 32 * 4)
True
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure import _step
from torchkiln.measure._step import module_ranges
from torchkiln.measure.flops import FlopCount, count_flops, peak_flops, training_step_flops
from torchkiln.measure.timing import set_threads, time_fn

__all__ = ["ProfileResult", "module_ranges", "profile", "write_bounded_trace"]

_MB = 1_000_000  # max_trace_mb is in megabytes of 10^6 bytes
_OWN_RANGES = ("ProfilerStep", "kiln::", "module::", "Optimizer.")


@dataclass
class ProfileResult:
    """What :func:`profile` measured. Times are milliseconds, memory bytes; see :meth:`to_results`.

    ``op_table`` rows: ``name``, ``self_ms``, ``total_ms``, ``calls`` (totals over the ``steps`` active
    steps), ``self_pct`` (of all profiled self time), ``input_shapes`` (the costliest shape group) and,
    with CUDA, ``self_device_ms`` / ``device_total_ms``. ``module_table`` rows: ``name`` (qualified,
    the model itself is ``(root)``), ``type``, ``total_ms`` (forward only), ``calls``.
    """

    model_name: str
    mode: str
    precision: str
    device: str
    threads: int
    batch_size: int | None
    steps: int
    wait: int
    warmup: int
    op_table: list[dict[str, Any]] = field(default_factory=list)
    module_table: list[dict[str, Any]] = field(default_factory=list)
    trace_path: str | None = None
    trace: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    flops: FlopCount | None = None
    step_ms: float | None = None
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    profiled_step_ms: float | None = None
    achieved_flops_per_s: float | None = None
    peak_flops_per_s: float | None = None
    mfu: float | None = None
    flop_error: str | None = None

    @property
    def flops_per_step(self) -> float | None:
        return float(self.flops.total) if self.flops is not None else None

    def to_results(self, model_name: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
        """The ``profile`` results dict of :mod:`torchkiln.report.schema` (JSON-serializable)."""
        uncounted = list(self.flops.uncounted_ops) if self.flops is not None else []
        if self.flop_error:
            uncounted.append(self.flop_error)
        return {
            "model": model_name or self.model_name,
            "mode": self.mode,
            "batch_size": batch_size if batch_size is not None else self.batch_size,
            "steps": self.steps,
            "wait": self.wait,
            "warmup": self.warmup,
            "precision": self.precision,
            "device": self.device,
            "threads": self.threads,
            "top_ops": self.op_table,
            "modules": self.module_table,
            "module_times": "forward only (module::<name> ranges opened by forward hooks)",
            "flops_per_step": self.flops_per_step,
            "flops_by_op": dict(self.flops.by_op) if self.flops is not None else {},
            "uncounted_ops": uncounted,
            "achieved_flops_per_s": self.achieved_flops_per_s,
            "peak_flops_per_s": self.peak_flops_per_s,
            "mfu": self.mfu,
            "step_ms": self.step_ms,
            "step_ms_min": self.step_ms_min,
            "step_ms_max": self.step_ms_max,
            "step_ms_source": "median of unprofiled steps timed after profiling",
            "profiled_step_ms": self.profiled_step_ms,
            "memory": self.memory,
            "trace": self.trace,
        }


# ------------------------------------------------------------------------------------------------ trace


def write_bounded_trace(source: str | os.PathLike, dest: str | os.PathLike, max_bytes: int) -> dict[str, Any]:
    """Write the Chrome trace JSON ``source`` to ``dest`` gzipped, at most ``max_bytes`` long.

    When the whole trace compresses to more than ``max_bytes``, events are dropped shortest first
    (``dur``; instant, flow and counter events count as 0) -- metadata events are always kept -- and the
    kept ones are written in their original order. Returns ``{"events", "dropped_events", "bytes",
    "max_bytes"}``; the file carries the same under its top-level ``kiln`` key.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> events = [{"ph": "X", "name": f"op{i}", "ts": i, "dur": i, "pid": 1, "tid": 1} for i in range(3000)]
    >>> _ = open(os.path.join(d, "t.json"), "w").write(json.dumps({"traceEvents": events}))
    >>> info = write_bounded_trace(os.path.join(d, "t.json"), os.path.join(d, "t.json.gz"), 5000)
    >>> info["bytes"] <= 5000 < info["dropped_events"] + 5000, info["events"] + info["dropped_events"]
    (True, 3000)
    """
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    events = data.get("traceEvents", [])
    meta = [e for e in events if e.get("ph") == "M"]
    rest = [e for e in events if e.get("ph") != "M"]
    by_length = sorted(range(len(rest)), key=lambda i: -float(rest[i].get("dur") or 0.0))

    def encode(keep: int) -> bytes:
        kept = sorted(by_length[:keep])
        data["traceEvents"] = meta + [rest[i] for i in kept]
        data["kiln"] = {
            "events": len(meta) + keep,
            "dropped_events": len(rest) - keep,
            "max_bytes": max_bytes,
            "rule": "shortest events dropped first until the gzipped trace fits",
        }
        return gzip.compress(json.dumps(data, separators=(",", ":")).encode("utf-8"), compresslevel=6)

    keep = len(rest)
    blob = encode(keep)
    while len(blob) > max_bytes and keep > 0:
        # Compressed size is close to proportional to the events kept: aim a little under the bound.
        keep = min(keep - 1, int(keep * max_bytes / len(blob) * 0.9))
        keep = max(keep, 0)
        blob = encode(keep)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dest).with_name(Path(dest).name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, dest)
    return {
        "events": len(meta) + keep,
        "dropped_events": len(rest) - keep,
        "bytes": len(blob),
        "max_bytes": max_bytes,
    }


# ------------------------------------------------------------------------------------------------ tables


def _is_own_range(key: str) -> bool:
    return key.startswith(_OWN_RANGES)


def _op_table(
    averages: list[Any], by_shape: list[Any], row_limit: int, use_device: bool
) -> list[dict[str, Any]]:
    total_self = sum(a.self_cpu_time_total for a in averages) or 1.0
    total_self_device = sum(getattr(a, "self_device_time_total", 0.0) for a in averages) or 1.0
    best_shape: dict[str, tuple[float, Any, int]] = {}
    for a in by_shape:
        cost = a.self_device_time_total if use_device else a.self_cpu_time_total
        best, shapes, groups = best_shape.get(a.key, (-1.0, None, 0))
        best_shape[a.key] = (cost, a.input_shapes, groups + 1) if cost > best else (best, shapes, groups + 1)
    ops = [a for a in averages if not a.is_user_annotation and not _is_own_range(a.key)]
    ops.sort(key=lambda a: -(a.self_device_time_total if use_device else a.self_cpu_time_total))
    rows = []
    for a in ops[:row_limit]:
        _, shapes, groups = best_shape.get(a.key, (0.0, None, 0))
        row: dict[str, Any] = {
            "name": a.key,
            "self_ms": a.self_cpu_time_total / 1e3,
            "total_ms": a.cpu_time_total / 1e3,
            "calls": int(a.count),
            "input_shapes": str(shapes) if shapes else "",
            "shape_groups": groups,
            "self_pct": 100.0 * a.self_cpu_time_total / total_self,
        }
        if use_device:
            row["self_device_ms"] = a.self_device_time_total / 1e3
            row["device_total_ms"] = a.device_time_total / 1e3
            row["self_device_pct"] = 100.0 * a.self_device_time_total / total_self_device
        rows.append(row)
    return rows


def _module_table(
    averages: list[Any], types: dict[str, str], module_limit: int, use_device: bool
) -> list[dict[str, Any]]:
    rows = []
    for a in averages:
        if a.key not in types:
            continue
        row: dict[str, Any] = {
            "name": a.key.removeprefix("module::"),
            "type": types[a.key],
            "total_ms": a.cpu_time_total / 1e3,
            "calls": int(a.count),
        }
        if use_device:
            row["device_total_ms"] = a.device_time_total / 1e3
        rows.append(row)
    rows.sort(key=lambda r: -(r["device_total_ms"] if use_device else r["total_ms"]))
    return rows[:module_limit]


def _profiled_step_ms(averages: list[Any]) -> float | None:
    for a in averages:
        if a.key.startswith("ProfilerStep") and a.count:
            return a.cpu_time_total / a.count / 1e3
    return None


def _memory_summary(
    events: list[Any], device: torch.device, baseline: int, cuda_peak: int | None, max_points: int
) -> dict[str, Any]:
    mem = _step.memory_events(events, device)
    steps = [e for e in events if e.name().startswith("ProfilerStep#")]
    t0 = min((int(e.start_ns()) for e in steps), default=mem[0][0] if mem else 0)
    points = [{"t_ms": 0.0, "bytes": baseline}]
    running = peak = baseline
    allocations = allocated_total = 0
    for t_ns, nbytes in mem:
        running += nbytes
        peak = max(peak, running)
        if nbytes > 0:
            allocations += 1
            allocated_total += nbytes
        points.append({"t_ms": (t_ns - t0) / 1e6, "bytes": running})
    out: dict[str, Any] = {
        "timeline": _step.downsample(points, max_points),
        "timeline_source": "profiler [memory] events: start level + running sum of their signed bytes",
        "events": len(mem),
        "allocations": allocations,
        "allocated_bytes_total": allocated_total,
        "start_bytes": baseline,
    }
    if device.type == "cuda":
        out["source"] = "CUDA caching allocator"
        out["peak_bytes"] = int(cuda_peak) if cuda_peak is not None else peak
        out["start_source"] = "torch.cuda.memory_allocated at the first active step"
    else:
        out["source"] = "profiler memory events (CPU)"
        out["peak_bytes"] = peak
        out["peak_above_start_bytes"] = peak - baseline
        out["start_source"] = (
            "tensor sizes at the first active step: parameters, buffers, gradients, optimizer state, inputs"
        )
    return out


# ------------------------------------------------------------------------------------------------ profile


def profile(
    model: nn.Module,
    inputs: Any,
    *,
    mode: Literal["train", "inference"] = "train",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    precision: str = "fp32",
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    out_dir: str | os.PathLike | None = None,
    max_trace_mb: float = 20.0,
    row_limit: int = 25,
    module_limit: int = 50,
    peak: float | Literal["auto", "cached"] | None = "auto",
    threads: int | None = None,
    step_context: Callable[[], AbstractContextManager] | None = None,
    timeline_points: int = 2000,
    model_name: str | None = None,
) -> ProfileResult:
    """Profile ``active`` training or inference steps of ``model`` on ``inputs`` (see the module doc).

    ``inputs``: a tensor (one positional argument), a tuple/list (positional arguments) or a dict
    (keyword arguments), already on the model's device. ``loss_fn(output) -> scalar`` (train mode) or a
    model that returns its loss. ``optimizer``: stepped in train mode (default ``SGD(lr=0)``); its state
    is restored afterwards. ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast (no loss scaling).
    ``out_dir``: where ``trace.json.gz`` goes (a new temporary folder when None). ``peak``: the machine
    peak in FLOP/s for MFU -- ``"auto"`` measures it once and caches it (:func:`peak_flops`),
    ``"cached"`` uses the cache only, a number is used as given, None skips MFU. ``threads``:
    ``torch.set_num_threads`` for the call (restored after). ``step_context``: a factory of a context
    entered around each step's forward and backward (e.g. an SDPA kernel choice). ``row_limit`` and
    ``module_limit`` cap the operator and module tables; ``timeline_points`` the memory timeline (each
    time bucket keeps its lowest and highest point); ``model_name`` names the model in the results.
    """
    where = "profile"
    if mode not in ("train", "inference"):
        raise KilnError(f"{where}: unknown mode {mode!r}; accepted: 'train', 'inference'")
    dtype = _step.check_precision(precision, where)
    if wait < 0 or warmup < 0 or active < 1:
        raise KilnError(
            f"{where}: need wait >= 0, warmup >= 0 and active >= 1, got {wait}, {warmup}, {active}"
        )
    if not max_trace_mb > 0:
        raise KilnError(f"{where}: max_trace_mb must be positive, got {max_trace_mb}")
    if not (peak is None or peak in ("auto", "cached") or isinstance(peak, (int, float))):
        raise KilnError(f"{where}: peak must be 'auto', 'cached', a number (FLOP/s) or None, got {peak!r}")
    device = _step.model_device(model)
    args, kwargs = _step.split_inputs(inputs)
    train = mode == "train"
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="kiln-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    context = step_context or nullcontext

    with set_threads(threads) as n_threads, _step.preserved_state(model, optimizer):
        model.train(train)
        opt = (optimizer or _step.default_optimizer(model, where)) if train else None

        def loss_of(output: Any) -> torch.Tensor:
            return _step.resolve_loss(output, loss_fn, where)

        def run_step(annotate: bool) -> None:
            def rng(name: str) -> AbstractContextManager:
                return torch.autograd.profiler.record_function(name) if annotate else nullcontext()

            if not train:
                with (
                    torch.inference_mode(),
                    context(),
                    _step.autocast(precision, device),
                    rng("kiln::forward"),
                ):
                    model(*args, **kwargs)
                return
            with context():
                with rng("kiln::forward"), _step.autocast(precision, device):
                    loss = loss_of(model(*args, **kwargs))
                with rng("kiln::backward"):
                    loss.backward()
            with rng("kiln::optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)

        flops, flop_error = _count_step_flops(model, args, kwargs, train, precision, device, loss_of, context)
        prof, types, baseline, cuda_peak = _run_profiler(
            model, opt, inputs, run_step, wait, warmup, active, device
        )
        events = _step.kineto_events(prof)
        averages = list(prof.key_averages())
        by_shape = list(prof.key_averages(group_by_input_shape=True))
        use_device = device.type == "cuda"
        result = ProfileResult(
            model_name=model_name or type(model).__name__,
            mode=mode,
            precision=precision,
            device=str(device),
            threads=n_threads,
            batch_size=_step.batch_size_of(inputs),
            steps=active,
            wait=wait,
            warmup=warmup,
            op_table=_op_table(averages, by_shape, row_limit, use_device),
            module_table=_module_table(averages, types, module_limit, use_device),
            memory=_memory_summary(events, device, baseline, cuda_peak, timeline_points),
            flops=flops,
            flop_error=flop_error,
            profiled_step_ms=_profiled_step_ms(averages),
        )
        fd, raw_name = tempfile.mkstemp(prefix=".trace-", suffix=".json", dir=out)
        os.close(fd)
        raw = Path(raw_name)
        try:
            prof.export_chrome_trace(str(raw))
            trace_path = out / "trace.json.gz"
            result.trace = write_bounded_trace(raw, trace_path, int(max_trace_mb * _MB))
            result.trace_path = str(trace_path)
            result.trace["path"] = str(trace_path)
        finally:
            raw.unlink(missing_ok=True)
        del prof, events, averages, by_shape

        # Unprofiled steps (no profiler, no hooks, no ranges): the step time MFU is computed from.
        stats = time_fn(lambda: run_step(False), warmup=1, min_rounds=active, max_rounds=active, max_time_s=0)
        result.step_ms = stats.median * 1e3
        result.step_ms_min = stats.min * 1e3
        result.step_ms_max = stats.max * 1e3

    if flops is not None and result.step_ms:
        result.achieved_flops_per_s = flops.total / (result.step_ms / 1e3)
        result.peak_flops_per_s = _peak(peak, dtype, device, n_threads)
        if result.peak_flops_per_s:
            result.mfu = result.achieved_flops_per_s / result.peak_flops_per_s
    return result


def _count_step_flops(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    train: bool,
    precision: str,
    device: torch.device,
    loss_of: Callable[[Any], torch.Tensor],
    context: Callable[[], AbstractContextManager],
) -> tuple[FlopCount | None, str | None]:
    """FLOPs of one step's forward (+ backward); (None, reason) when FlopCounterMode fails on the model."""
    try:
        with context(), _step.autocast(precision, device):
            if train:
                return training_step_flops(model, kwargs if kwargs else args, loss_fn=loss_of), None
            with torch.inference_mode():
                return count_flops(model, *args, **kwargs), None
    except KilnError:
        raise
    except Exception as exc:  # noqa: BLE001 - FLOPs are informational; the profile still stands
        return None, f"FLOP counting failed: {type(exc).__name__}: {exc}"


def _run_profiler(
    model: nn.Module,
    opt: torch.optim.Optimizer | None,
    inputs: Any,
    run_step: Callable[[bool], None],
    wait: int,
    warmup: int,
    active: int,
    device: torch.device,
) -> tuple[Any, dict[str, str], int, int | None]:
    """Run the scheduled profiler; (profiler, module range types, start bytes, CUDA peak or None)."""
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    cuda = device.type == "cuda"
    baseline, cuda_peak = 0, None
    with warnings.catch_warnings():  # warmup=0 is the caller's choice; torch warns about it
        warnings.filterwarnings("ignore", message=".*won't be using warmup.*")
        steps = schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    with (
        module_ranges(model) as types,
        torch_profile(
            activities=activities,
            schedule=steps,
            record_shapes=True,
            profile_memory=True,
        ) as prof,
    ):
        for i in range(wait + warmup + active):
            if i == wait + warmup:  # the first active step starts here
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    baseline = int(torch.cuda.memory_allocated(device))
                else:
                    baseline = _step.state_bytes(model, opt, inputs)
            run_step(True)
            if cuda:  # so each ProfilerStep range covers its kernels, not only their launches
                torch.cuda.synchronize(device)
            prof.step()
        if cuda:
            torch.cuda.synchronize(device)
            cuda_peak = int(torch.cuda.max_memory_allocated(device))
    return prof, types, baseline, cuda_peak


def _peak(peak: float | str | None, dtype: torch.dtype, device: torch.device, threads: int) -> float | None:
    if peak is None:
        return None
    if isinstance(peak, (int, float)) and not isinstance(peak, bool):
        return float(peak) if peak > 0 and math.isfinite(peak) else None
    from torchkiln.measure.flops import cached_peak_flops

    if peak == "cached":
        return cached_peak_flops(dtype, device, threads=threads)
    return peak_flops(dtype, device, threads=threads)
