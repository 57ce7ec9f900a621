"""Turn what a user names on the command line into an eval-mode ``nn.Module`` with trained weights.

A model is named as a zoo name (``resnet-tiny``), a user factory (``pkg.mod:make``, ``path/file.py:make``),
a recipe (``recipe.toml``), or a training run: a run directory or its ``model.pt`` (the run's
``recipe.json`` says how to build the model). ``weights`` is a ``state_dict`` file (``model.pt`` from
``kiln train``, or a training checkpoint holding one under ``"model"``), loaded with ``weights_only=True``.

>>> model = resolve_model("mlp", {"hidden": [16]})
>>> type(model).__name__, model.training
('MLP', False)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from torchkiln.export.spec import ExportError

__all__ = ["load_weights", "resolve_model", "run_dir_of"]


def run_dir_of(target: str | os.PathLike[str]) -> Path | None:
    """The training run directory ``target`` names (the directory, or its ``model.pt``), or None."""
    path = Path(target)
    if path.is_dir() and (path / "recipe.json").is_file():
        return path
    if path.is_file() and path.suffix in (".pt", ".pth") and (path.parent / "recipe.json").is_file():
        return path.parent
    return None


def _from_recipe_data(data: dict[str, Any], source: str) -> nn.Module:
    from torchkiln.recipe import validate_recipe
    from torchkiln.train.from_recipe import build_from_recipe

    recipe = validate_recipe(data, source)
    model, _, _, _ = build_from_recipe(recipe)
    return model


def load_weights(model: nn.Module, weights: str | os.PathLike[str]) -> nn.Module:
    """Load a ``state_dict`` file (or a training checkpoint's ``"model"`` entry) into ``model``."""
    from torchkiln.train.checkpoint import load_checkpoint, load_model_state

    state = load_checkpoint(weights)
    if isinstance(state, dict) and "format_version" in state and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ExportError(f"{weights} holds a {type(state).__name__}, not a state_dict of a model")
    load_model_state(model, state, weights)
    return model


def resolve_model(
    target: str | os.PathLike[str] | nn.Module,
    model_args: dict[str, Any] | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """An eval-mode module for ``target`` (see the module docstring), with ``weights`` loaded if given.

    For a run directory or its ``model.pt`` the weights are the run's ``model.pt`` unless ``weights``
    says otherwise.
    """
    if isinstance(target, nn.Module):
        model = target
    else:
        text = str(target)
        run_dir = run_dir_of(text)
        if run_dir is not None:
            if model_args:
                raise ExportError(f"{text} is a training run: its recipe.json fixes the model's arguments")
            data = json.loads((run_dir / "recipe.json").read_text(encoding="utf-8"))
            model = _from_recipe_data(data, str(run_dir / "recipe.json"))
            if weights is None:
                weights = Path(text) if Path(text).is_file() else run_dir / "model.pt"
        elif text.endswith(".toml"):
            from torchkiln.recipe import load_recipe
            from torchkiln.train.from_recipe import build_from_recipe

            if not Path(text).is_file():
                raise ExportError(f"recipe {text} does not exist")
            if model_args:
                raise ExportError("model arguments come from the recipe; set them there or with --set")
            model, _, _, _ = build_from_recipe(load_recipe(text))
        elif text.endswith((".pt", ".pth")) and Path(text).is_file():
            raise ExportError(
                f"{text} is a weights file without a recipe.json beside it, so the model it belongs to is "
                "unknown: name the model (zoo name, pkg.mod:fn or file.py:fn) and pass the file as weights "
                "(kiln export MODEL --weights model.pt)"
            )
        else:
            from torchkiln.zoo import create_model

            model = create_model(text, **(model_args or {}))
            if not isinstance(model, nn.Module):
                raise ExportError(f"{text} made a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        if not Path(weights).is_file():
            raise ExportError(f"weights file {weights} does not exist")
        load_weights(model, weights)
    return model.eval()
