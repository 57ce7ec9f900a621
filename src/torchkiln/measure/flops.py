"""FLOPs: counting them (FlopCounterMode), the machine's measured GEMM peak, and MFU.

A multiply-add is 2 FLOPs everywhere. ``count_flops`` also lists the ops that ran but that
``FlopCounterMode`` has no formula for (softmax, norms, elementwise ...), so a figure never hides what it
left out. ``peak_flops`` times large ``torch.mm`` calls once per machine, thread count, torch version and
dtype and caches the result as JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from torchkiln.errors import KilnError
from torchkiln.measure.env import cpu_model_name
from torchkiln.measure.timing import set_threads

__all__ = [
    "FlopCount",
    "UnsupportedDtypeError",
    "cached_peak_flops",
    "count_flops",
    "device_name",
    "mfu",
    "peak_cache_path",
    "peak_flops",
    "training_step_flops",
]


class UnsupportedDtypeError(KilnError, ValueError):
    """A dtype for which torchkiln does not measure a GEMM peak."""


# --------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------

# Ops that move, view, allocate or fill memory but do no arithmetic; they are not reported as uncounted.
_FLOP_FREE = frozenset(
    {
        "_local_scalar_dense", "_reshape_alias", "_to_copy", "_unsafe_view", "alias", "arange",
        "as_strided", "as_strided_", "cat", "chunk", "clone", "constant_pad_nd", "contiguous", "copy",
        "copy_", "detach", "detach_", "dim", "embedding", "empty", "empty_like", "empty_strided",
        "equal", "expand", "expand_as", "fill", "fill_", "flatten", "full", "full_like", "gather",
        "index", "index_select", "is_contiguous", "is_non_overlapping_and_dense", "is_same_size",
        "is_strides_like_format", "item", "lift_fresh", "lift_fresh_copy", "narrow", "new_empty",
        "new_empty_strided", "new_full", "new_ones", "new_zeros", "numel", "ones", "ones_like",
        "permute", "repeat", "reshape", "resize_", "resolve_conj", "resolve_neg", "scalar_tensor",
        "select", "select_backward", "set_", "size", "slice", "slice_backward", "split",
        "split_with_sizes", "squeeze", "squeeze_", "stack", "storage_offset", "stride",
        "sym_is_contiguous", "sym_numel", "sym_size", "sym_storage_offset", "sym_stride", "t", "t_",
        "transpose", "transpose_", "unbind", "unflatten", "unsqueeze", "unsqueeze_", "view",
        "view_as", "zero_", "zeros", "zeros_like",
    }
)  # fmt: skip
_FLOP_FREE_NAMESPACES = frozenset({"prim", "profiler", "prims"})


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call: ``total``, per aten op (``"aten.mm"`` ...), and the ops with no formula.

    ``uncounted_ops`` are ops that ran but contributed nothing to ``total`` because FlopCounterMode has
    no formula for them (e.g. ``aten._softmax``, ``aten.native_layer_norm``, ``aten.gelu``, ``aten.add``);
    pure data movement (views, copies, allocation) is left out of that list.
    """

    total: int
    by_op: dict[str, int] = field(default_factory=dict)
    uncounted_ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _OpRecorder(TorchDispatchMode):
    """Records the aten op packets that actually execute (below FlopCounterMode's decompositions)."""

    def __init__(self) -> None:
        super().__init__()
        self.packets: set[Any] = set()
        self.views: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.packets.add(func.overloadpacket)
        if getattr(func, "is_view", False):
            self.views.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def _op_name(packet: Any) -> str:
    return str(packet)  # "aten.addmm"


def _is_flop_free(packet: Any, view_packets: set[Any]) -> bool:
    name = _op_name(packet)
    namespace, _, short = name.partition(".")
    return namespace in _FLOP_FREE_NAMESPACES or short in _FLOP_FREE or packet in view_packets


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Count the FLOPs of ``fn(*args, **kwargs)`` with ``torch.utils.flop_counter.FlopCounterMode``.

    Runs ``fn`` once (forward and, if ``fn`` calls it, backward). A multiply-add counts 2 FLOPs.

    >>> lin = torch.nn.Linear(8, 4)
    >>> c = count_flops(lin, torch.randn(3, 8))
    >>> c.total == 2 * 3 * 8 * 4, c.by_op
    (True, {'aten.addmm': 192})
    >>> "aten._softmax" in count_flops(torch.softmax, torch.randn(3, 8), -1).uncounted_ops
    True
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    recorder = _OpRecorder()
    counter = FlopCounterMode(display=False)
    # The recorder sits below the counter, so it sees the ops the counter itself executed (after it
    # decomposed composite ops it has no formula for). Attention runs on the math kernel while counting:
    # its matmuls are then counted (FlopCounterMode has no formula for the CPU flash kernel), which is
    # the usual model-FLOPs convention (full QK^T and AV products).
    with recorder, counter, sdpa_kernel([SDPBackend.MATH]):
        fn(*args, **kwargs)
    by_op = {_op_name(p): int(n) for p, n in counter.get_flop_counts().get("Global", {}).items()}
    registry = counter.flop_registry
    uncounted = sorted(
        {_op_name(p) for p in recorder.packets if p not in registry and not _is_flop_free(p, recorder.views)}
    )
    return FlopCount(total=int(counter.get_total_flops()), by_op=by_op, uncounted_ops=uncounted)


def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _resolve_loss(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(output)
    if isinstance(output, torch.Tensor):
        return output if output.numel() == 1 else output.float().sum()
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    raise KilnError(
        f"training_step_flops: cannot find a loss in the model output of type {type(output).__name__}; "
        "accepted: a tensor (a scalar is used as is, otherwise its float sum), an object with a .loss "
        "tensor, a mapping with a 'loss' tensor, or pass loss_fn=lambda output: ..."
    )


def training_step_flops(
    model: torch.nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> FlopCount:
    """FLOPs of one training step (forward + backward, no optimizer step) without changing the model.

    ``inputs``: a tensor (one positional argument), a tuple/list (positional arguments) or a dict
    (keyword arguments). The loss is ``loss_fn(output)`` when given; otherwise the output itself if it is
    a scalar tensor, ``output.loss`` / ``output["loss"]`` if present, else ``output.float().sum()``.

    Model state is left as found: buffers (e.g. BatchNorm running stats) are restored, the RNG is forked
    (dropout draws do not advance the global generator) and each parameter's ``.grad`` is set back to the
    very tensor (or None) it was before. The model's train/eval mode is not changed: call it in the mode
    you want counted.

    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> fwd = count_flops(mlp, torch.randn(2, 8)).total
    >>> step = training_step_flops(mlp, torch.randn(2, 8)).total
    >>> 2 * fwd < step <= 3 * fwd   # backward ~2x forward (no input grad for the first layer)
    True
    """
    args, kwargs = _split_inputs(inputs)
    saved_buffers = [
        (module, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    saved_grads = [(p, p.grad) for p in model.parameters()]
    cuda_devices = (
        list(range(torch.cuda.device_count()))
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else []
    )

    def step() -> None:
        loss = _resolve_loss(model(*args, **kwargs), loss_fn)
        loss.backward()

    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for p, _ in saved_grads:
                p.grad = None  # so backward allocates fresh grads instead of adding into the user's
            return count_flops(step)
    finally:
        for p, grad in saved_grads:
            p.grad = grad
        with torch.no_grad():
            for module, name, original, copy in saved_buffers:
                original.copy_(copy)
                module._buffers[name] = original


def mfu(achieved_flops_per_s: float, peak: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the machine's peak FLOP/s (a fraction, not %).

    >>> mfu(50e9, 200e9)
    0.25
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return achieved_flops_per_s / peak


# --------------------------------------------------------------------------------------------------
# Machine peak
# --------------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU_SIZES = (1024, 2048)  # the largest is skipped when one call would take too long
_CUDA_SIZES = (8192, 4096)  # first that fits in memory
_BUDGET_PER_SIZE_S = 1.0  # timed samples per GEMM size
_SAMPLE_S = 0.05  # one sample runs enough GEMMs to last about this long
_MAX_CALL_S = 0.5  # do not try a size whose single GEMM would take longer than this
_MIN_SAMPLES = 3
_MAX_SAMPLES = 40


def peak_cache_path() -> Path:
    """``$TORCHKILN_CACHE/peak_flops.json``, else ``$XDG_CACHE_HOME/torchkiln`` or ``~/.cache/torchkiln``."""
    root = os.environ.get("TORCHKILN_CACHE")
    if root:
        return Path(root) / "peak_flops.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "torchkiln" / "peak_flops.json"


def device_name(device: str | torch.device = "cpu") -> str:
    """The hardware name used to key the peak cache: the CPU model or the GPU name.

    >>> device_name("cpu") == cpu_model_name()
    True
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    if dev.type == "cpu":
        return cpu_model_name()
    return dev.type


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in _SUPPORTED_DTYPES)
        raise UnsupportedDtypeError(f"peak_flops: unsupported dtype {dtype}; accepted: {names}")


def _cache_key(dtype: torch.dtype, device: str | torch.device, threads: int) -> str:
    dev = torch.device(device)
    parts = [device_name(dev), dev.type]
    if dev.type == "cpu":
        parts.append(f"threads={threads}")
    parts += [f"torch={torch.__version__}", str(dtype).removeprefix("torch.")]
    if dtype == torch.float32:  # TF32 / bf16 passes for fp32 matmul change the peak
        parts.append(f"fp32_precision={torch.get_float32_matmul_precision()}")
    return "|".join(parts)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``key`` to the cache file atomically: write a temp file in the same folder, then os.replace."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)  # re-read just before writing to keep other processes' entries
        data[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=".peak_flops.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"could not write the peak FLOP/s cache {path}: {exc}", RuntimeWarning, stacklevel=3)


def _best_rate(run: Callable[[int], float], flop: float) -> tuple[float, float]:
    """Max FLOP/s over samples; ``run(reps)`` returns the seconds ``reps`` GEMMs took.

    Returns (best rate, seconds of one GEMM).
    """
    run(1)  # warm-up: thread pools, allocator, kernel selection
    single = run(1)
    best = flop / single if single > 0 else 0.0
    reps = max(1, int(_SAMPLE_S / max(single, 1e-9)))
    deadline = time.perf_counter() + _BUDGET_PER_SIZE_S
    samples = 0
    while samples < _MIN_SAMPLES or (time.perf_counter() < deadline and samples < _MAX_SAMPLES):
        dt = run(reps)
        if dt > 0:
            best = max(best, reps * flop / dt)
        samples += 1
    return best, single


def _cpu_run(n: int, dtype: torch.dtype) -> Callable[[int], float]:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)

    def run(reps: int) -> float:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        return time.perf_counter() - start

    return run


def _cuda_run(n: int, dtype: torch.dtype, dev: torch.device) -> Callable[[int], float]:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def run(reps: int) -> float:
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    return run


def _measure_gemm_peak(dtype: torch.dtype, device: str | torch.device) -> tuple[float, int]:
    """Time square ``torch.mm`` GEMMs; returns (best FLOP/s, matrix size it was reached at)."""
    dev = torch.device(device)
    best, best_n = 0.0, 0
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(dev):
            for n in _CUDA_SIZES:
                try:
                    rate, _ = _best_rate(_cuda_run(n, dtype, dev), 2.0 * n**3)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    continue
                torch.cuda.empty_cache()
                return rate, n
        raise KilnError(f"peak_flops: no GEMM size in {_CUDA_SIZES} fits in memory on {dev}")
    if dev.type != "cpu":
        raise KilnError(f"peak_flops: unsupported device {dev}; accepted: cpu, cuda")
    previous_n, single = 0, 0.0
    for n in _CPU_SIZES:
        if previous_n and single * (n / previous_n) ** 3 > _MAX_CALL_S:
            break
        rate, single = _best_rate(_cpu_run(n, dtype), 2.0 * n**3)
        previous_n = n
        if rate > best:
            best, best_n = rate, n
    return best, best_n


def cached_peak_flops(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
) -> float | None:
    """The cached peak for this device/threads/torch/dtype, or None when it was never measured."""
    _check_dtype(dtype)
    threads = threads if threads is not None else torch.get_num_threads()
    entry = _read_cache(peak_cache_path()).get(_cache_key(dtype, device, threads))
    if isinstance(entry, dict) and isinstance(entry.get("flops_per_s"), (int, float)):
        return float(entry["flops_per_s"])
    return None


def _peak_flops_with_source(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    refresh: bool = False,
) -> tuple[float, bool]:
    """(peak FLOP/s, whether it came from the cache)."""
    _check_dtype(dtype)
    with set_threads(threads) as effective:
        if not refresh:
            cached = cached_peak_flops(dtype, device, threads=effective)
            if cached is not None:
                return cached, True
        rate, n = _measure_gemm_peak(dtype, device)
        # A busy neighbour can only make a measurement low, never high: keep the best one seen.
        previous = cached_peak_flops(dtype, device, threads=effective)
        if previous is not None and previous > rate:
            return previous, True
        entry = {
            "flops_per_s": rate,
            "gemm_size": n,
            "device": device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": effective,
            "torch": torch.__version__,
            "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        _write_cache_entry(peak_cache_path(), _cache_key(dtype, device, effective), entry)
    return rate, False


def peak_flops(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    refresh: bool = False,
) -> float:
    """This machine's measured dense GEMM peak in FLOP/s for ``dtype`` on ``device``.

    Times square ``torch.mm`` (CPU: 1024 and 2048, skipping 2048 where it would be too slow; CUDA: 8192
    timed with CUDA events), after warm-up, in samples of several calls, and keeps the best sustained
    rate. Takes a second or three per dtype on a small CPU. The result is cached in
    :func:`peak_cache_path` keyed by device name, threads (CPU), torch version, dtype and, for float32,
    ``torch.get_float32_matmul_precision()``; ``refresh=True`` re-measures. ``threads`` (CPU) sets
    ``torch.set_num_threads`` while measuring; by default the current count is used.

    >>> peak_flops(torch.float32) > 0  # doctest: +SKIP
    True
    """
    return _peak_flops_with_source(dtype, device, threads=threads, refresh=refresh)[0]
