"""Memory measurements: bytes saved for backward (activation memory), process RSS, CUDA allocator stats.

``saved_tensor_bytes`` is deterministic (it counts tensors, not allocator noise), so tests may assert on
it; ``rss_bytes`` is the CPU resident set from psutil (noisy: the allocator keeps freed pages);
``cuda_memory_stats`` reads ``torch.cuda`` allocator counters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

__all__ = ["SavedTensorStats", "cuda_memory_stats", "rss_bytes", "saved_tensor_bytes"]


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
