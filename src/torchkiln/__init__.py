"""torchkiln: make PyTorch models train faster, run faster and take less memory, and measure it.

Public names are imported lazily so that ``import torchkiln`` and ``kiln --help`` stay fast.

>>> import torchkiln as tk
>>> "gpt-tiny" in tk.list_models()
True
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # zoo
    "create_model": "torchkiln.zoo",
    "list_models": "torchkiln.zoo",
    "register_model": "torchkiln.zoo",
    "create_dataset": "torchkiln.zoo",
    "list_datasets": "torchkiln.zoo",
    "register_dataset": "torchkiln.zoo",
    "load_reference": "torchkiln.zoo",
    "resolve_target": "torchkiln.targets",
    "Target": "torchkiln.targets",
    # recipe
    "Recipe": "torchkiln.recipe",
    "TrainConfig": "torchkiln.recipe",
    "load_recipe": "torchkiln.recipe",
    # train
    "fit": "torchkiln.train",
    "evaluate": "torchkiln.train",
    "FitResult": "torchkiln.train",
    "lr_at": "torchkiln.train",
    "apply_activation_checkpointing": "torchkiln.train",
    "build_optimizer": "torchkiln.train",
    "load_checkpoint": "torchkiln.train",
    # measure
    "collect_env": "torchkiln.measure",
    "peak_flops": "torchkiln.measure",
    "count_flops": "torchkiln.measure",
    "saved_tensor_bytes": "torchkiln.measure",
    "profile": "torchkiln.measure",
    "bench": "torchkiln.measure",
    "list_variants": "torchkiln.measure",
    "memory_analysis": "torchkiln.measure",
    # compress
    "quantize": "torchkiln.compress.api",
    "prune": "torchkiln.compress.api",
    "list_techniques": "torchkiln.compress.registry",
    "describe_techniques": "torchkiln.compress.registry",
    "compare_models": "torchkiln.compress.compare",
    "Int8Dynamic": "torchkiln.compress.quantize",
    "Int8Static": "torchkiln.compress.quantize",
    "Int8WeightOnly": "torchkiln.compress.quantize",
    "Int8QAT": "torchkiln.compress.quantize",
    "Int4WeightOnly": "torchkiln.compress.quantize",
    "save_quantized": "torchkiln.compress.quantize",
    "load_quantized": "torchkiln.compress.quantize",
    "sensitivity": "torchkiln.compress.sensitivity",
    "keep_sensitive_in_float": "torchkiln.compress.sensitivity",
    "ChannelPrune": "torchkiln.compress.prune",
    "save_pruned": "torchkiln.compress.prune",
    "load_pruned": "torchkiln.compress.prune",
    "distill": "torchkiln.compress.distill",
    "Distill": "torchkiln.compress.distill",
    "MagnitudePrune": "torchkiln.compress.sparse",
    "GradualPruning": "torchkiln.compress.sparse",
    # export
    "export": "torchkiln.export",
    "load_predictor": "torchkiln.export",
    "fuse": "torchkiln.export",
    "ExportVerificationError": "torchkiln.export",
    # optimize
    "optimize": "torchkiln.optimize",
    "Candidate": "torchkiln.optimize",
    "accuracy_evaluator": "torchkiln.optimize",
    "agreement_evaluator": "torchkiln.optimize",
    # errors
    "KilnError": "torchkiln.errors",
    "RecipeError": "torchkiln.errors",
    "UserCodeError": "torchkiln.errors",
    "NonFiniteLossError": "torchkiln.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkiln' has no attribute {name!r}")
    imported = importlib.import_module(module)
    # `tk.export` is the package itself (callable: tk.export(model, ...)), so tk.export.load_predictor and
    # friends work whichever is touched first.
    value = imported if module == f"{__name__}.{name}" else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
