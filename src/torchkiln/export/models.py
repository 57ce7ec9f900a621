"""Turn what a user names on the command line into an eval-mode ``nn.Module`` with trained weights.

Every kind :func:`torchkiln.targets.resolve_target` understands is accepted: an ``nn.Module``, a zoo name
(``resnet-tiny``), a user factory (``pkg.mod:make``, ``path/file.py:make``) with ``model_args``, a recipe
(``recipe.toml``), a training run (its directory or its ``model.pt``; the run's ``recipe.json`` says how
to build the model) or a pruned artifact (``kiln prune``). ``weights`` is a ``state_dict`` file
(``model.pt`` from ``kiln train``, or a training checkpoint holding one under ``"model"``), loaded with
``weights_only=True``.

>>> model = resolve_model("mlp", {"hidden": [16]})
>>> type(model).__name__, model.training
('MLP', False)
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from torchkiln.targets import load_weights, resolve_target, run_dir_of

__all__ = ["load_weights", "resolve_model", "run_dir_of"]


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
    return resolve_target(target, weights=weights, model_args=model_args).model
