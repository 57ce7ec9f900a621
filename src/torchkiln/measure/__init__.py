"""Measurement: timing, FLOPs and machine peak, memory, profiles, and the environment a figure was taken on.

Depends on nothing else in torchkiln except ``torchkiln.errors``; everything else may use it.
See /work/shared/BENCHMARKING.md for how these pieces back the benchmark scripts.
"""

from __future__ import annotations

from torchkiln.measure.bench import BenchResult, bench, interleaved_compare, is_out_of_memory
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
from torchkiln.measure.memory import (
    MemoryReport,
    ModuleActivationStats,
    SavedTensorStats,
    activation_bytes_by_module,
    cuda_memory_stats,
    memory_analysis,
    rss_bytes,
    saved_tensor_bytes,
)
from torchkiln.measure.profile import ProfileResult, module_ranges, profile, write_bounded_trace
from torchkiln.measure.timing import (
    RatioStats,
    TimingStats,
    interleaved_ratio,
    percentile,
    set_threads,
    time_fn,
)
from torchkiln.measure.variants import VariantError, VariantUnavailableError, apply_variant, list_variants

__all__ = [
    "CPU_FLAGS",
    "BenchResult",
    "FlopCount",
    "MemoryReport",
    "ModuleActivationStats",
    "ProfileResult",
    "RatioStats",
    "SavedTensorStats",
    "TimingStats",
    "UnsupportedDtypeError",
    "VariantError",
    "VariantUnavailableError",
    "activation_bytes_by_module",
    "apply_variant",
    "bench",
    "cached_peak_flops",
    "collect_env",
    "count_flops",
    "cpu_flags",
    "cpu_model_name",
    "cuda_memory_stats",
    "device_name",
    "interleaved_compare",
    "interleaved_ratio",
    "is_out_of_memory",
    "list_variants",
    "memory_analysis",
    "mfu",
    "module_ranges",
    "peak_cache_path",
    "peak_flops",
    "percentile",
    "profile",
    "rss_bytes",
    "saved_tensor_bytes",
    "set_threads",
    "time_fn",
    "training_step_flops",
    "write_bounded_trace",
]
