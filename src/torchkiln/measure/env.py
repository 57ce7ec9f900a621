"""The machine and software a measurement was taken on: versions, CPU/GPU features, optional GEMM peak.

Everything here is cheap and free of personal data (no hostname, no user name, no paths). Optional
packages are looked up with ``importlib.metadata`` so nothing heavy is imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import psutil
import torch

__all__ = ["CPU_FLAGS", "OPTIONAL_PACKAGES", "collect_env", "cpu_flags", "cpu_model_name", "peak_dtypes"]

CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
OPTIONAL_PACKAGES = (
    "torchao",
    "torch_pruning",
    "onnx",
    "onnxruntime",
    "transformers",
    "tensorboard",
    "fastapi",
)
# Distribution names differ from import names for some packages.
_DIST_NAMES = {"torch_pruning": ("torch-pruning", "torch_pruning")}


def _package_version(name: str) -> str | None:
    for dist in _DIST_NAMES.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere).

    >>> isinstance(cpu_model_name(), str) and len(cpu_model_name()) > 0
    True
    """
    info = _cpuinfo()
    name = info.get("model name") or info.get("Model") or info.get("Hardware") or platform.processor()
    return " ".join(name.split()) or platform.machine() or "unknown-cpu"


def cpu_flags() -> dict[str, bool]:
    """The CPU features torchkiln cares about (see ``CPU_FLAGS``) as ``{flag: present}``.

    All False where ``/proc/cpuinfo`` is not available (non-Linux).

    >>> sorted(cpu_flags()) == sorted(CPU_FLAGS)
    True
    """
    flags = set(_cpuinfo().get("flags", "").split())
    return {flag: flag in flags for flag in CPU_FLAGS}


def _git_commit() -> str | None:
    """The commit checked out in the current directory, or None (not a repo, no commits, no git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _cpu_env() -> dict[str, Any]:
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    mkldnn_fp16 = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)

    def _call(f: Any) -> bool | None:
        if f is None:
            return None
        try:
            return bool(f())
        except Exception:  # an optional probe must never break env collection
            return None

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = None
    return {
        "model": cpu_model_name(),
        "machine": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "flags": cpu_flags(),
        "capability": capability,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkldnn_bf16": _call(mkldnn_bf16),
        "mkldnn_fp16": _call(mkldnn_fp16),
        "mkl": torch.backends.mkl.is_available(),
        "openmp": torch.backends.openmp.is_available(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }


def _cuda_env() -> dict[str, Any]:
    available = torch.cuda.is_available()
    env: dict[str, Any] = {
        "available": available,
        "device_count": torch.cuda.device_count() if available else 0,
        "cuda_version": torch.version.cuda,
        "hip_version": getattr(torch.version, "hip", None),
        "cudnn_version": None,
        "bf16_supported": False,
        "devices": [],
    }
    if not available:
        return env
    try:
        env["cudnn_version"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        pass
    try:
        env["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    except Exception:
        pass
    for i in range(env["device_count"]):
        props = torch.cuda.get_device_properties(i)
        env["devices"].append(
            {
                "index": i,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "total_memory_bytes": int(props.total_memory),
                "multiprocessors": int(props.multi_processor_count),
            }
        )
    return env


def peak_dtypes(device: str | torch.device = "cpu") -> list[torch.dtype]:
    """The dtypes whose GEMM peak ``kiln env`` reports: fp32 and bf16 on CPU; fp32, bf16, fp16 on CUDA."""
    if torch.device(device).type == "cuda":
        dtypes = [torch.float32]
        if torch.cuda.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        dtypes.append(torch.float16)
        return dtypes
    return [torch.float32, torch.bfloat16]


def collect_env(measure_peak: bool = False, *, refresh_peak: bool = False) -> dict[str, Any]:
    """Versions, CPU and GPU features of this machine as a JSON-serialisable dict.

    Top-level keys: ``python``, ``platform``, ``packages`` (installed version or None), ``torch``,
    ``cpu``, ``cuda``, ``git_commit``. With ``measure_peak=True`` also ``peak_flops``
    (``{dtype_name: FLOP/s}`` for the current device: CUDA device 0 when CUDA is available, else CPU)
    and ``peak_flops_source`` (device name, threads, and per dtype whether the value came from the
    cache). Peaks are cached (see :func:`torchkiln.measure.peak_flops`); ``refresh_peak`` re-measures.

    >>> env = collect_env()
    >>> sorted(env) == ["cpu", "cuda", "git_commit", "packages", "platform", "python", "torch"]
    True
    """
    packages: dict[str, str | None] = {"numpy": _package_version("numpy")}
    packages.update({name: _package_version(name) for name in OPTIONAL_PACKAGES})
    packages["torchkiln"] = _package_version("torchkiln")
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "implementation": platform.python_implementation(),
        },
        "packages": packages,
        "torch": {
            "version": torch.__version__,
            "git_version": getattr(torch.version, "git_version", None),
            "debug": bool(getattr(torch.version, "debug", False)),
        },
        "cpu": _cpu_env(),
        "cuda": _cuda_env(),
        "git_commit": _git_commit(),
    }
    if measure_peak:
        from torchkiln.measure.flops import _peak_flops_with_source, device_name

        device = "cuda" if torch.cuda.is_available() else "cpu"
        values: dict[str, float] = {}
        cached: dict[str, bool] = {}
        for dtype in peak_dtypes(device):
            key = str(dtype).removeprefix("torch.")
            values[key], cached[key] = _peak_flops_with_source(dtype, device, refresh=refresh_peak)
        env["peak_flops"] = values
        env["peak_flops_source"] = {
            "device": device_name(device),
            "threads": torch.get_num_threads(),
            "cached": cached,
        }
    return env
