"""Compression that is measured: quantization, structured pruning and distillation.

Each technique is a frozen config registered in :mod:`torchkiln.compress.registry`;
``quantize(model, config)`` and ``prune(model, config)`` dispatch on the config's type, and
:func:`~torchkiln.compress.compare.compare_models` prints the before/after table (parameters, artifact
size, FLOPs, latency in the same execution mode, accuracy or output agreement). Names are imported lazily
so ``import torchkiln.compress`` does not pull in torchao or Torch-Pruning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "quantize": "torchkiln.compress.api",
    "prune": "torchkiln.compress.api",
    "list_techniques": "torchkiln.compress.registry",
    "describe_techniques": "torchkiln.compress.registry",
    "get_technique": "torchkiln.compress.registry",
    "check_technique": "torchkiln.compress.registry",
    "register_technique": "torchkiln.compress.registry",
    "TechniqueError": "torchkiln.compress.registry",
    "TechniqueUnavailableError": "torchkiln.compress.registry",
    "compare_models": "torchkiln.compress.compare",
    "CompressionReport": "torchkiln.compress.compare",
    "ChannelPrune": "torchkiln.compress.prune",
    "save_pruned": "torchkiln.compress.prune",
    "load_pruned": "torchkiln.compress.prune",
    "distill": "torchkiln.compress.distill",
    "Distill": "torchkiln.compress.distill",
    "MagnitudePrune": "torchkiln.compress.sparse",
    "GradualPruning": "torchkiln.compress.sparse",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkiln.compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
