"""Memory measurements: bytes saved for backward (activation memory), process RSS, CUDA allocator stats,
activation memory per module, and memory across the phases of a training step.

``saved_tensor_bytes`` is deterministic (it counts tensors, not allocator noise), so tests may assert on
it; ``activation_bytes_by_module`` splits the same total by the module whose forward saved each tensor;
``rss_bytes`` is the CPU resident set from psutil (noisy: the allocator keeps freed pages);
``cuda_memory_stats`` reads ``torch.cuda`` allocator counters; ``memory_analysis`` measures initial,
per-phase (forward, backward, optimizer) and peak memory of one step, saying where each figure comes from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

__all__ = [
    "MemoryReport",
    "ModuleActivationStats",
    "SavedTensorStats",
    "activation_bytes_by_module",
    "call_peak_bytes",
    "cuda_memory_stats",
    "memory_analysis",
    "onnx_process_peak_bytes",
    "rss_bytes",
    "saved_tensor_bytes",
]


@dataclass
class SavedTensorStats:
    """What autograd kept for backward while ``fn`` ran.

    ``bytes``: total size of the distinct storages saved (a view pins its whole storage, and a storage
    saved twice counts once). ``count``: number of distinct storages. ``result``: what ``fn`` returned,
    so the caller can still call ``backward()`` on it.
    """

    bytes: int
    count: int
    result: Any = field(repr=False, default=None)


def _is_parameter_like(t: torch.Tensor) -> bool:
    """A leaf that requires grad (a parameter) or a view of one (e.g. ``weight.t()`` inside Linear)."""
    if t.is_leaf and t.requires_grad:
        return True
    base = t._base
    return base is not None and base.is_leaf and base.requires_grad


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[Any, int]:
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        nbytes = storage.nbytes()
        if ptr != 0:
            return (t.device.type, t.device.index, ptr), nbytes
        return ("id", id(storage)), nbytes
    except (RuntimeError, NotImplementedError):  # sparse, nested or other storage-less tensors
        return ("id", id(t)), t.numel() * t.element_size()


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> SavedTensorStats:
    """Run ``fn(*args, **kwargs)`` and count the bytes autograd saves for backward (activation memory).

    Every tensor handed to a ``torch.autograd.graph.saved_tensors_hooks`` pack hook is counted once per
    storage (deduplicated by ``untyped_storage().data_ptr()``). Parameters, other leaves that require
    grad and views of them are excluded: they live anyway, they are not activations. Saved inputs that
    do not require grad (the batch) are counted, since the graph keeps them alive.

    Activation checkpointing: non-reentrant checkpointing (``torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False)``) installs its own saved-tensor hooks inside the checkpointed region; the
    innermost hooks win, so tensors saved inside the region never reach this outer hook -- which is
    exactly the memory checkpointing saves. What remains visible is the region's inputs, which checkpoint
    keeps to recompute. Reentrant checkpointing runs the region under ``no_grad`` and is likewise counted
    only by its saved inputs.

    >>> a = torch.randn(4, 8, requires_grad=True)      # a leaf: excluded
    >>> stats = saved_tensor_bytes(lambda: (a * 2).sin().exp())
    >>> stats.bytes, stats.count   # sin saves its input, exp its output: 2 x 4*8 float32
    (256, 2)
    >>> stats.result.sum().backward()
    """
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_parameter_like(t):
            key, nbytes = _storage_key_and_bytes(t)
            seen.setdefault(key, nbytes)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        result = fn(*args, **kwargs)
    return SavedTensorStats(bytes=sum(seen.values()), count=len(seen), result=result)


def rss_bytes() -> int:
    """Resident set size of this process in bytes (psutil).

    >>> rss_bytes() > 0
    True
    """
    return int(psutil.Process().memory_info().rss)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the duration (native libraries print there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def call_peak_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes the host allocator held above its starting level during one ``fn()`` call (its
    output included): the transient working memory of an inference call, counted from the profiler's
    ``[memory]`` events (``profile_memory=True``), so cached allocator pages do not hide it and other
    threads' noise does not add to it. Runtimes with their own allocator (ONNX Runtime) are invisible
    here: see :func:`onnx_process_peak_bytes`.

    >>> call_peak_bytes(lambda: torch.zeros(1024, 1024)) >= 4 * 1024 * 1024
    True
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from torchkiln.measure import _step

    prof = torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's start/stop banners, not the call's own messages
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    del out
    running = peak = 0
    for _, nbytes in _step.memory_events(_step.kineto_events(prof), torch.device("cpu")):
        running += nbytes
        peak = max(peak, running)
    return peak


_ORT_PEAK_SCRIPT = r"""
import ctypes, gc, sys
import numpy as np, onnxruntime as ort

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no " + field + " in /proc/self/status")

path, threads, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
feeds_file = np.load(sys.argv[4])
feeds = {name: feeds_file[name] for name in feeds_file.files}
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.log_severity_level = 3

def session():
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

# A first session loads the runtime's code and thread pool (resident once per process, whatever the
# model); freed again and trimmed, so the second session's growth is what this model costs.
sess = session()
sess.run(None, feeds)
del sess
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
start = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # the high-water mark starts from here
    f.write("5")
sess = session()
for _ in range(calls):
    sess.run(None, feeds)
print(status("VmHWM") - start)
"""


def onnx_process_peak_bytes(
    path: str | os.PathLike[str],
    inputs: Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    threads: int = 1,
    calls: int = 3,
    timeout_s: float = 120.0,
) -> int:
    """Peak resident memory an ONNX Runtime session adds to a fresh process that loads ``path`` and runs
    ``calls`` inferences on ``inputs``: the growth of the kernel's high-water mark (``VmHWM``, reset through
    ``/proc/self/clear_refs``) over the RSS after a first session of the same model has loaded the runtime
    and been freed (``malloc_trim``): weights, ORT's arena and activations together, which is what serving
    the model costs, without the runtime's own code and thread pool. Linux (glibc) only.

    ``inputs``: one tensor (the model's first input) or ``{input name: tensor}``.
    """
    import subprocess
    import sys
    import tempfile

    import numpy as np

    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("onnx_process_peak_bytes needs Linux /proc (VmHWM and clear_refs)")
    if isinstance(inputs, torch.Tensor):
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        init = {i.name for i in graph.initializer}
        names = [i.name for i in graph.input if i.name not in init]
        inputs = {names[0]: inputs}
    with tempfile.TemporaryDirectory(prefix="kiln-ortmem-") as tmp:
        feeds = Path(tmp) / "feeds.npz"
        np.savez(feeds, **{k: v.detach().cpu().numpy() for k, v in inputs.items()})
        proc = subprocess.run(
            [sys.executable, "-c", _ORT_PEAK_SCRIPT, str(path), str(threads), str(calls), str(feeds)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"measuring ONNX Runtime memory for {path} failed: {tail[0]}")
    return int(proc.stdout.strip().splitlines()[-1])


def cuda_memory_stats(device: int | str | torch.device | None = None) -> dict[str, int]:
    """CUDA allocator counters for ``device`` (default: the current one) in bytes; ``{}`` without CUDA.

    Keys: ``allocated``, ``max_allocated``, ``reserved``, ``max_reserved``, ``total`` (device memory).
    Reset the peaks with ``torch.cuda.reset_peak_memory_stats(device)`` before the region you measure.

    >>> isinstance(cuda_memory_stats(), dict)
    True
    """
    if not torch.cuda.is_available():
        return {}
    if device is None:
        device = torch.cuda.current_device()
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "max_allocated": int(torch.cuda.max_memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
        "max_reserved": int(torch.cuda.max_memory_reserved(device)),
        "total": int(torch.cuda.get_device_properties(device).total_memory),
    }


# --------------------------------------------------------------------------------------------------
# Activation memory per module
# --------------------------------------------------------------------------------------------------

OUTSIDE_MODULES = "(outside modules)"


@dataclass
class ModuleActivationStats:
    """Bytes saved for backward while ``fn`` ran, attributed to the module whose forward saved them.

    ``by_module`` rows (modules in ``named_modules()`` order, only those that saved something, then
    ``(outside modules)`` for what was saved outside any module's forward, e.g. by the loss):
    ``name`` (qualified; the model itself is ``(root)``), ``type``, ``saved_bytes`` (saved while this
    module was the innermost one running: these rows sum to ``bytes``), ``total_saved_bytes`` (this
    module and its submodules), ``tensors`` (distinct storages). ``bytes``/``count`` match what
    :func:`saved_tensor_bytes` reports for the same call.
    """

    bytes: int
    count: int
    by_module: list[dict[str, Any]] = field(default_factory=list)
    result: Any = field(repr=False, default=None)


def activation_bytes_by_module(
    model: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> ModuleActivationStats:
    """Run ``fn(*args, **kwargs)`` (which calls ``model``) and attribute activation memory to modules.

    A ``saved_tensors_hooks`` pack hook sees every tensor autograd saves; forward pre-hooks and forward
    hooks on every submodule keep a stack of the modules currently running, and each newly seen storage
    is charged to the innermost one. Storages are deduplicated (a storage saved again, in the same or a
    later module, counts once, to the first), parameters and views of them are excluded -- the same
    rules as :func:`saved_tensor_bytes`, so the rows sum to its total.

    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> x = torch.randn(2, 8)
    >>> stats = activation_bytes_by_module(net, lambda: net(x).sum())
    >>> [(r["name"], r["saved_bytes"]) for r in stats.by_module]   # x, relu output (x2: relu, 2nd linear)
    [('(root)', 0), ('0', 64), ('1', 128)]
    >>> stats.bytes == saved_tensor_bytes(lambda: net(x).sum()).bytes
    True
    """
    from torchkiln.measure._step import ROOT_LABEL, module_hooks

    stack: list[str] = []
    owner: dict[Any, tuple[int, str | None]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_parameter_like(t):
            key, nbytes = _storage_key_and_bytes(t)
            if key not in owner:
                owner[key] = (nbytes, stack[-1] if stack else None)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def enter(name: str, module: torch.nn.Module) -> None:
        stack.append(name)

    def leave(name: str, module: torch.nn.Module) -> None:
        if stack:
            stack.pop()

    with module_hooks(model, enter, leave), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        result = fn(*args, **kwargs)

    self_bytes: dict[str | None, int] = {}
    self_count: dict[str | None, int] = {}
    for nbytes, name in owner.values():
        self_bytes[name] = self_bytes.get(name, 0) + nbytes
        self_count[name] = self_count.get(name, 0) + 1
    rows = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        total = sum(b for n, b in self_bytes.items() if n is not None and (n == name or n.startswith(prefix)))
        if total == 0:
            continue
        rows.append(
            {
                "name": name or ROOT_LABEL,
                "type": type(module).__name__,
                "saved_bytes": self_bytes.get(name, 0),
                "total_saved_bytes": total,
                "tensors": self_count.get(name, 0),
            }
        )
    if None in self_bytes:
        rows.append(
            {
                "name": OUTSIDE_MODULES,
                "type": "",
                "saved_bytes": self_bytes[None],
                "total_saved_bytes": self_bytes[None],
                "tensors": self_count[None],
            }
        )
    return ModuleActivationStats(
        bytes=sum(self_bytes.values()), count=len(owner), by_module=rows, result=result
    )


# --------------------------------------------------------------------------------------------------
# Memory across one training step
# --------------------------------------------------------------------------------------------------

PHASES = ("initial", "forward", "backward", "optimizer")


@dataclass
class MemoryReport:
    """Memory across one training step: see :func:`memory_analysis` and :meth:`to_results`.

    ``phases``: one dict per phase (``initial``, ``forward``, ``backward``, ``optimizer``) with
    ``allocated_bytes`` (held at the phase's end), ``peak_bytes`` (highest during it), ``delta_bytes``
    (growth over it), ``rss_bytes`` / ``rss_delta_bytes`` (process RSS at its end, and its change).
    ``sources`` says where each figure comes from.
    """

    device: str
    source: str
    sources: dict[str, str]
    phases: list[dict[str, Any]]
    activations: ModuleActivationStats
    timeline: list[dict[str, Any]]
    precision: str
    optimizer: str
    batch_size: int | None
    model_name: str
    threads: int

    @property
    def initial_bytes(self) -> int:
        return int(self.phases[0]["allocated_bytes"])

    @property
    def peak_bytes(self) -> int:
        return max(int(p["peak_bytes"]) for p in self.phases)

    @property
    def final_bytes(self) -> int:
        return int(self.phases[-1]["allocated_bytes"])

    def phase(self, name: str) -> dict[str, Any]:
        for p in self.phases:
            if p["phase"] == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p['phase'] for p in self.phases]}")

    def to_results(self, model_name: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
        """The ``memory`` results dict of :mod:`torchkiln.report.schema` (JSON-serializable)."""
        return {
            "model": model_name or self.model_name,
            "batch_size": batch_size if batch_size is not None else self.batch_size,
            "device": self.device,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "threads": self.threads,
            "source": self.source,
            "sources": dict(self.sources),
            "initial_bytes": self.initial_bytes,
            "peak_bytes": self.peak_bytes,
            "final_bytes": self.final_bytes,
            "phases": [dict(p) for p in self.phases],
            "activation_bytes": self.activations.bytes,
            "activation_tensors": self.activations.count,
            "activation_bytes_by_module": [dict(r) for r in self.activations.by_module],
            "timeline": list(self.timeline),
        }


def memory_analysis(
    model: torch.nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    precision: str = "fp32",
    threads: int | None = None,
    step_context: Callable[[], Any] | None = None,
    timeline_points: int = 2000,
    model_name: str | None = None,
) -> MemoryReport:
    """Memory before and across the forward (with the loss), backward and optimizer step of one step.

    ``inputs``: a tensor, a tuple/list (positional arguments) or a dict (keywords), on the model's device.
    ``loss_fn(output) -> scalar``, or a model that returns its loss. ``optimizer`` (default ``SGD(lr=0)``):
    stepped once; a first step is where optimizers such as Adam allocate their state, so its growth shows.
    Model and optimizer are left as found (values, gradients, train/eval flags, optimizer state and the
    global RNG are restored); gradients start as None, as after ``zero_grad(set_to_none=True)``.

    Sources, stated in ``sources``: on CUDA, ``allocated``/``peak`` come from the caching allocator
    (``torch.cuda.memory_allocated``, and ``max_memory_allocated`` with the peak reset at each phase's
    start). On CPU, ``initial`` is counted from tensor sizes (parameters, buffers, optimizer state,
    inputs: distinct storages) and each phase adds the profiler's ``[memory]`` events (``torch.profiler``
    with ``profile_memory=True``; each event one allocation or free with its signed size), assigned to a
    phase by time against the ``kiln::forward/backward/optimizer`` ranges; the peak is the highest running
    total. RSS (psutil) is read at each phase's end on both; it is noisy (the allocator keeps freed pages)
    but shows what the operating system sees. Activation memory per module: see
    :func:`activation_bytes_by_module` (forward and loss).

    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    >>> rep = memory_analysis(net, torch.randn(64, 32), loss_fn=lambda out: out.square().mean())
    >>> [p["phase"] for p in rep.phases]
    ['initial', 'forward', 'backward', 'optimizer']
    >>> rep.phase("forward")["delta_bytes"] > 0, rep.peak_bytes >= rep.initial_bytes
    (True, True)
    """
    from contextlib import nullcontext

    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from torchkiln.measure import _step
    from torchkiln.measure.timing import set_threads

    where = "memory_analysis"
    _step.check_precision(precision, where)
    device = _step.model_device(model)
    cuda = device.type == "cuda"
    args, kwargs = _step.split_inputs(inputs)
    context = step_context or nullcontext
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    marks: dict[str, dict[str, int]] = {}

    def mark(phase: str) -> None:
        if cuda:
            torch.cuda.synchronize(device)
            marks[phase] = {
                "allocated": int(torch.cuda.memory_allocated(device)),
                "peak": int(torch.cuda.max_memory_allocated(device)),
                "rss": rss_bytes(),
            }
            torch.cuda.reset_peak_memory_stats(device)
        else:
            marks[phase] = {"rss": rss_bytes()}

    with set_threads(threads) as n_threads, _step.preserved_state(model, optimizer):
        model.train()
        opt = optimizer or _step.default_optimizer(model, where)
        initial_state = _step.state_bytes(model, opt, inputs)
        mark("initial")

        def forward() -> torch.Tensor:
            with _step.autocast(precision, device):
                return _step.resolve_loss(model(*args, **kwargs), loss_fn, where)

        with torch_profile(activities=activities, profile_memory=True) as prof:
            with context():
                with record_function("kiln::forward"):
                    activations = activation_bytes_by_module(model, forward)
                    loss = activations.result
                    activations.result = None
                mark("forward")
                with record_function("kiln::backward"):
                    loss.backward()
                mark("backward")
            with record_function("kiln::optimizer"):
                opt.step()
            mark("optimizer")
        del loss
        events = _step.kineto_events(prof)
        del prof

    ranges = _step.range_events(events, ("kiln::forward", "kiln::backward", "kiln::optimizer"))
    mem = _step.memory_events(events, device)
    start_bytes = marks["initial"]["allocated"] if cuda else initial_state
    ends = [ranges.get(f"kiln::{p}", (0, 0))[1] for p in PHASES[1:]]
    t0 = ranges.get("kiln::forward", (mem[0][0] if mem else 0, 0))[0]
    phases = [
        {
            "phase": "initial",
            "allocated_bytes": start_bytes,
            "peak_bytes": start_bytes,
            "delta_bytes": 0,
            "rss_bytes": marks["initial"]["rss"],
            "rss_delta_bytes": 0,
        }
    ]
    points = [{"t_ms": 0.0, "bytes": start_bytes, "phase": "initial"}]
    running, i = start_bytes, 0
    for phase, end in zip(PHASES[1:], ends, strict=True):
        begin, peak = running, running
        last = phase == PHASES[-1]
        while i < len(mem) and (last or mem[i][0] <= end):
            running += mem[i][1]
            peak = max(peak, running)
            points.append({"t_ms": (mem[i][0] - t0) / 1e6, "bytes": running, "phase": phase})
            i += 1
        if cuda:  # the allocator's own figures; the events only draw the timeline
            running = marks[phase]["allocated"]
            peak = marks[phase]["peak"]
        if end:  # every phase ends with a point, even one that allocated nothing
            points.append({"t_ms": max(0.0, (end - t0) / 1e6), "bytes": running, "phase": phase})
        phases.append(
            {
                "phase": phase,
                "allocated_bytes": running,
                "peak_bytes": max(peak, running),
                "delta_bytes": running - begin,
                "rss_bytes": marks[phase]["rss"],
                "rss_delta_bytes": marks[phase]["rss"] - phases[-1]["rss_bytes"],
            }
        )
    timeline = []
    for phase in PHASES:
        timeline += _step.downsample([p for p in points if p["phase"] == phase], timeline_points // 4)
    if cuda:
        source = "CUDA caching allocator"
        sources = {
            "initial": "torch.cuda.memory_allocated",
            "allocated": "torch.cuda.memory_allocated at the phase's end",
            "peak": "torch.cuda.max_memory_allocated, reset at the phase's start",
        }
    else:
        source = "profiler memory events + RSS (psutil)"
        sources = {
            "initial": "tensor sizes: parameters, buffers, gradients, optimizer state, inputs",
            "allocated": "initial + running sum of the profiler's CPU [memory] events",
            "peak": "highest running total of the profiler's CPU [memory] events in the phase",
        }
    sources["rss"] = "psutil RSS of the process at the phase's end (noisy: the allocator keeps freed pages)"
    sources["timeline"] = "profiler [memory] events (signed bytes per allocation/free) over the step"
    sources["activations"] = "saved_tensors_hooks pack hook + forward hooks (innermost module; storages once)"
    return MemoryReport(
        device=str(device),
        source=source,
        sources=sources,
        phases=phases,
        activations=activations,
        timeline=timeline,
        precision=precision,
        optimizer=type(opt).__name__ + ("" if optimizer is not None else "(lr=0, none given)"),
        batch_size=_step.batch_size_of(inputs),
        model_name=model_name or type(model).__name__,
        threads=n_threads,
    )
