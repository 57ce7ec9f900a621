"""``quantize`` and ``prune``: one entry point per family, dispatching on the config's registered type."""

from __future__ import annotations

from typing import Any

from torch import nn

from torchkiln.compress.registry import TechniqueError, get_technique, list_techniques, require

__all__ = ["prune", "quantize"]


def _apply(family: str, model: nn.Module, config: Any, kwargs: dict[str, Any]) -> Any:
    if not isinstance(model, nn.Module):
        raise TechniqueError(f"{family}: expected an nn.Module, got {type(model).__name__}")
    tech = get_technique(config)
    if tech.family != family:
        raise TechniqueError(
            f"{family}: {type(config).__name__} is a {tech.family!r} technique ({tech.name}); "
            f"{family} techniques: {', '.join(list_techniques(family + '/*'))}"
        )
    require(config)
    return tech.apply(model, config, **kwargs)


def quantize(model: nn.Module, config: Any, **kwargs: Any) -> Any:
    """Quantize ``model`` with ``config`` (a registered ``quantize/*`` config); returns the quantized model.

    Keyword arguments (``example_inputs=``, ``calibration=``, ``filter_fn=``...) go to the technique.
    """
    return _apply("quantize", model, config, kwargs)


def prune(model: nn.Module, config: Any, **kwargs: Any) -> Any:
    """Prune ``model`` with ``config`` (a registered ``prune/*`` config); returns the pruned model."""
    return _apply("prune", model, config, kwargs)
