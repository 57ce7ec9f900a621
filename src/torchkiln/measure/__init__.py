"""Measurement: timing, FLOPs and machine peak, memory, and the environment a figure was taken on.

Depends on nothing else in torchkiln except ``torchkiln.errors``; everything else may use it.
See /work/shared/BENCHMARKING.md for how these pieces back the benchmark scripts.
"""

from __future__ import annotations

from torchkiln.measure.env import CPU_FLAGS, collect_env, cpu_flags, cpu_model_name
from torchkiln.measure.flops import (
    FlopCount,
    UnsupportedDtypeError,
    cached_peak_flops,
    count_flops,
    device_name,
    mfu,
    peak_cache_path,
    peak_flops,
    training_step_flops,
)
from torchkiln.measure.memory import SavedTensorStats, cuda_memory_stats, rss_bytes, saved_tensor_bytes
from torchkiln.measure.timing import (
    RatioStats,
    TimingStats,
    interleaved_ratio,
    percentile,
    set_threads,
    time_fn,
)

__all__ = [
    "CPU_FLAGS",
    "FlopCount",
    "RatioStats",
    "SavedTensorStats",
    "TimingStats",
    "UnsupportedDtypeError",
    "cached_peak_flops",
    "collect_env",
    "count_flops",
    "cpu_flags",
    "cpu_model_name",
    "cuda_memory_stats",
    "device_name",
    "interleaved_ratio",
    "mfu",
    "peak_cache_path",
    "peak_flops",
    "percentile",
    "rss_bytes",
    "saved_tensor_bytes",
    "set_threads",
    "time_fn",
    "training_step_flops",
]
