"""Which model a user means: one resolver that turns a target named on the command line (or passed from
Python) into an eval-mode model, with what is needed to feed it, score it and rebuild it.

A target is one of these kinds (:data:`KINDS`):

- ``zoo``: a registered model name (``mlp``, ``resnet-tiny``, ``gpt-tiny``), built with ``model_args``;
- ``reference``: user code, ``pkg.mod:fn`` or ``path/file.py:fn``, called with ``model_args``;
- ``recipe``: a recipe ``.toml`` (with ``--set`` overrides); it brings its train and val data;
- ``run``: a ``kiln train`` run, its directory or its ``model.pt`` beside ``recipe.json``; the run's
  recipe builds the model, its ``model.pt`` (or the file named) holds the weights, and it brings its data;
- ``pruned``: a pruned artifact ``.pt`` written by ``save_pruned`` / ``kiln prune`` (recognized by its
  format, wherever it lies); one made from a recipe or a run brings that recipe's data;
- ``module``: a ``torch.nn.Module`` (from Python), taken as it is.

``weights`` is a ``state_dict`` file (``model.pt``), a training checkpoint (its ``"model"`` entry) or a
sparse file from ``kiln prune --method magnitude``, loaded with ``weights_only=True``.

>>> target = resolve_target("mlp", model_args={"hidden": [16]})
>>> target.kind, target.name, type(target.model).__name__, target.model.training
('zoo', 'mlp', 'MLP', False)
>>> target.example_inputs(4)[0].shape
torch.Size([4, 64])
>>> resolve_target("mpl")
Traceback (most recent call last):
...
torchkiln.targets.TargetError: 'mpl' is not a zoo model (did you mean 'mlp'?); accepted: zoo models ...
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.errors import KilnError

__all__ = [
    "KINDS",
    "NAMED_KINDS",
    "Target",
    "TargetError",
    "data_inputs",
    "load_weights",
    "resolve_target",
    "run_dir_of",
    "target_kind",
]

KINDS = ("zoo", "reference", "recipe", "run", "pruned", "module")
"""Every kind of target :func:`resolve_target` understands."""

NAMED_KINDS = ("zoo", "reference", "recipe", "run", "pruned")
"""The kinds a command-line argument can name (everything but an ``nn.Module``)."""

_WEIGHT_SUFFIXES = (".pt", ".pth")
_PATH_SUFFIXES = (".toml", ".json", ".py", *_WEIGHT_SUFFIXES)


class TargetError(KilnError, ValueError):
    """A target does not name a model that can be built, or names one of a kind that is not accepted."""


_NOUNS = {
    "zoo": "a zoo model",
    "reference": "user code",
    "recipe": "a recipe",
    "run": "a training run",
    "pruned": "a pruned artifact",
    "module": "a torch.nn.Module",
}


def _accepted(accept: Collection[str]) -> str:
    """What ``accept`` admits, for error messages."""
    forms = {
        "reference": "user code (pkg.mod:fn or file.py:fn)",
        "recipe": "recipes (.toml, with --set overrides)",
        "run": "training runs (a run directory, or its model.pt beside recipe.json)",
        "pruned": "pruned artifacts (.pt from kiln prune / save_pruned)",
        "module": "torch.nn.Module objects",
    }
    if "zoo" in accept:
        from torchkiln.zoo import list_models

        forms["zoo"] = f"zoo models ({', '.join(list_models())})"
    return "accepted: " + "; ".join(forms[k] for k in KINDS if k in accept)


@dataclass
class Target:
    """A resolved target: the eval-mode ``model`` and what comes with it.

    ``input_fn(batch_size)`` makes example inputs (from the recipe's data where there is one, else the
    model's ``example_inputs``), None when neither exists. ``model_ref`` / ``model_args`` say how to build
    the model again (what ``save_pruned`` records); ``source`` describes the target for the run history.
    """

    model: nn.Module
    name: str
    kind: str
    input_fn: Callable[[int], Any] | None = None
    train_data: Any = None
    val_data: Any = None
    recipe: Any = None
    model_ref: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def example_inputs(self, batch_size: int) -> tuple[Any, ...] | dict[str, Any]:
        """Example model inputs at ``batch_size``: a tuple of positional inputs, or a dict of keyword inputs.

        >>> resolve_target("gpt-tiny").example_inputs(3)[0].shape
        torch.Size([3, 128])
        """
        if self.input_fn is None:
            raise TargetError(
                f"{self.source.get('target', self.name)}: no example inputs: {type(self.model).__name__} has "
                "no example_inputs(batch_size) method and the target brings no data; give a recipe (.toml) "
                "or a training run, so the inputs come from its data"
            )
        inputs = self.input_fn(batch_size)
        if isinstance(inputs, dict):
            return inputs
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def data_inputs(data: Any, batch_size: int) -> Any:
    """Model inputs from a real batch: ``batch_size`` items of ``data`` (cycling if it is smaller),
    collated, with the target dropped (the last element of a tuple, a target key of a dict).

    >>> from torchkiln.zoo import create_dataset
    >>> data_inputs(create_dataset("digits"), 5)[0].shape
    torch.Size([5, 64])
    """
    from torch.utils.data import default_collate

    from torchkiln.train.loss import TARGET_KEYS

    n = len(data)
    if n == 0:
        raise TargetError("the training data is empty: no batch to make example inputs from")
    batch = default_collate([data[i % n] for i in range(batch_size)])
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if isinstance(batch, (tuple, list)):
        return tuple(batch[:-1]) if len(batch) > 1 else tuple(batch)
    return batch


def run_dir_of(target: str | os.PathLike[str]) -> Path | None:
    """The training run directory ``target`` names (the directory, or a ``.pt`` file in it), or None."""
    path = Path(target)
    if path.is_dir() and (path / "recipe.json").is_file():
        return path
    if path.is_file() and path.suffix in _WEIGHT_SUFFIXES and (path.parent / "recipe.json").is_file():
        return path.parent
    return None


def _read_format(path: Path) -> str | None:
    """The ``format`` a torchkiln file declares (pruned, sparse), None for plain state_dicts and others.
    Memory-mapped, so the weights of a large file are not read."""
    for mmap in (True, False):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # noqa: BLE001 - a file that is not a torch.save zip (or not readable)
            continue
        fmt = payload.get("format") if isinstance(payload, dict) else None
        return fmt if isinstance(fmt, str) else None
    return None


def load_weights(model: nn.Module, weights: str | os.PathLike[str]) -> nn.Module:
    """Load ``weights`` into ``model``: a ``state_dict`` file, a training checkpoint (its ``"model"``
    entry) or a sparse file from ``save_sparse``; every one read with ``weights_only=True``."""
    from torchkiln.compress.prune import FORMAT as PRUNED_FORMAT
    from torchkiln.compress.sparse import SPARSE_FORMAT, load_sparse
    from torchkiln.train.checkpoint import load_checkpoint, load_model_state

    path = Path(weights)
    if not path.is_file():
        raise TargetError(f"weights file {path}: no such file")
    state = load_checkpoint(path)
    if isinstance(state, dict) and state.get("format") == PRUNED_FORMAT:
        raise TargetError(
            f"weights file {path} is a pruned artifact, a model of its own (its shapes differ from the "
            "unpruned model's): give it as the model, not as weights"
        )
    if isinstance(state, dict) and state.get("format") == SPARSE_FORMAT:
        return load_sparse(path, model)
    if isinstance(state, dict) and "format_version" in state and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise TargetError(f"weights file {path} holds a {type(state).__name__}, not a state_dict of a model")
    load_model_state(model, state, path)
    return model


def target_kind(target: str | os.PathLike[str] | nn.Module, *, accept: Collection[str] = KINDS) -> str:
    """Which kind of target ``target`` is (one of :data:`KINDS`), without building anything.

    A directory with ``recipe.json`` is a run; a registered name is a zoo model even where a file of
    that name exists; a ``.pt`` file is a pruned artifact if its format says so, else a run's weights if
    ``recipe.json`` lies beside it. ``accept`` only shapes the error messages' list of what is accepted.

    >>> target_kind("resnet-tiny"), target_kind("my_models:make_net"), target_kind(nn.Linear(2, 2))
    ('zoo', 'reference', 'module')
    """
    if isinstance(target, nn.Module):
        return "module"
    if not isinstance(target, (str, os.PathLike)):
        raise TargetError(
            f"a target is a name or a path, got {type(target).__name__} {target!r}; {_accepted(accept)}"
        )
    from torchkiln.zoo import is_reference, list_models

    text = os.fspath(target)
    path = Path(text)
    if path.is_dir() and (path / "recipe.json").is_file():
        return "run"
    if text in list_models():
        return "zoo"
    if path.is_file():
        if path.suffix == ".toml":
            return "recipe"
        if path.suffix in _WEIGHT_SUFFIXES:
            from torchkiln.compress.prune import FORMAT as PRUNED_FORMAT

            if _read_format(path) == PRUNED_FORMAT:
                return "pruned"
            if (path.parent / "recipe.json").is_file():
                return "run"
            raise TargetError(
                f"{text} is a weights file without a recipe.json beside it, so the model it belongs to is "
                "unknown: name the model (a zoo name, pkg.mod:fn, file.py:fn or a recipe .toml) and pass the "
                "file with --weights (weights= from Python)"
            )
        if path.suffix == ".py":
            raise TargetError(
                f"{text} is a Python file: name the function that builds the model, {text}:make_model"
            )
        raise TargetError(f"{text} is a file of no kind a model is given as; {_accepted(accept)}")
    if path.is_dir():
        raise TargetError(
            f"{text} is a directory without recipe.json, so not a training run; {_accepted(accept)}"
        )
    if is_reference(text) or (":" in text and not text.endswith(_PATH_SUFFIXES)):
        return "reference"  # a malformed reference ("x.py:", "pkg:1fn") is explained by its loader
    if text.endswith(_PATH_SUFFIXES) or "/" in text or os.sep in text:
        raise TargetError(f"{text}: no such file or directory; {_accepted(accept)}")
    close = difflib.get_close_matches(text, list_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TargetError(f"{text!r} is not a zoo model{hint}; {_accepted(accept)}")


def _recipe_target(
    recipe: Any, kind: str, name: str, source: dict[str, Any], model: nn.Module | None = None
) -> Target:
    """A target whose data (and, unless ``model`` is given, model) comes from ``recipe``."""
    from torchkiln.train.from_recipe import build_from_recipe

    built, train, val, filled = build_from_recipe(recipe)
    return Target(
        model=built if model is None else model,
        name=name,
        kind=kind,
        input_fn=lambda bs: data_inputs(train, bs),
        train_data=train,
        val_data=val,
        recipe=recipe,
        model_ref=recipe.model.name,
        model_args={**dict(recipe.model.args), **filled},
        source=source,
    )


def _own_inputs(model: nn.Module) -> Callable[[int], Any] | None:
    make = getattr(model, "example_inputs", None)
    return make if callable(make) else None


def resolve_target(
    target: str | os.PathLike[str] | nn.Module,
    *,
    weights: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    model_args: dict[str, Any] | None = None,
    accept: Collection[str] = KINDS,
    command: str | None = None,
) -> Target:
    """The :class:`Target` ``target`` names (see the module docstring for the kinds), in eval mode.

    ``weights`` are loaded into the model; for a run they default to the run's ``model.pt`` (or the
    ``.pt`` file named). ``overrides`` (``--set a.b=c``) apply to recipes only and ``model_args`` to zoo
    models and code references only. ``accept`` lists the kinds the caller takes (``command``, such as
    ``"kiln prune"``, is named when a kind is refused).

    >>> resolve_target("mlp", overrides=["train.lr=0.1"])
    Traceback (most recent call last):
    ...
    torchkiln.targets.TargetError: --set overrides need a recipe (.toml); mlp is a zoo model
    """
    unknown = set(accept) - set(KINDS)
    if unknown:
        raise ValueError(f"accept: unknown kinds {sorted(unknown)}; kinds: {', '.join(KINDS)}")
    kind = target_kind(target, accept=accept)
    text = type(target).__name__ if isinstance(target, nn.Module) else os.fspath(target)
    if kind not in accept:
        who = command or "this command"
        raise TargetError(f"{text} is {_NOUNS[kind]}, which {who} does not take; {_accepted(accept)}")
    overrides = list(overrides)
    if overrides and kind != "recipe":
        raise TargetError(
            f"--set overrides need a recipe (.toml); {text} is {_NOUNS[kind]}"
            + (", whose recipe.json is fixed" if kind == "run" else "")
        )
    if model_args and kind not in ("zoo", "reference"):
        hint = ""
        if kind == "recipe":
            hint = " (set them in its [model] args, or with --set model.args.NAME=VALUE)"
        raise TargetError(
            f"model arguments apply to zoo models and code references; {text} is {_NOUNS[kind]}, "
            f"which fixes its model's arguments{hint}"
        )
    if weights is not None and not Path(weights).is_file():
        raise TargetError(f"weights file {weights}: no such file")
    source: dict[str, Any] = {"target": text, "kind": kind, "weights": str(weights) if weights else None}
    if overrides:
        source["overrides"] = overrides

    if kind == "module":
        assert isinstance(target, nn.Module)
        resolved = Target(target, text, kind, _own_inputs(target), source=source)
    elif kind in ("zoo", "reference"):
        from torchkiln.zoo import create_model

        args = dict(model_args or {})
        model = create_model(text, **args)
        name = text if kind == "zoo" else text.rpartition(":")[2]
        resolved = Target(
            model, name, kind, _own_inputs(model), model_ref=text, model_args=args, source=source
        )
    elif kind == "recipe":
        from torchkiln.recipe import load_recipe

        recipe = load_recipe(text, overrides)
        resolved = _recipe_target(recipe, kind, recipe.name or Path(text).stem, source)
    elif kind == "run":
        from torchkiln.recipe import validate_recipe

        run_dir = run_dir_of(text)
        assert run_dir is not None
        recipe_path = run_dir / "recipe.json"
        recipe = validate_recipe(json.loads(recipe_path.read_text(encoding="utf-8")), str(recipe_path))
        if weights is None:
            weights = Path(text) if Path(text).is_file() else run_dir / "model.pt"
            if not weights.is_file():
                raise TargetError(
                    f"{run_dir} is a training run without model.pt (it has not finished): pass a "
                    "checkpoint of it with --weights"
                )
            source["weights"] = str(weights)
        resolved = _recipe_target(recipe, kind, recipe.name or run_dir.resolve().name, source)
    else:  # pruned
        from torchkiln.compress.prune import ModelRef, load_pruned, read_pruned_metadata

        model = load_pruned(text)
        meta = read_pruned_metadata(text)
        ref = ModelRef.from_dict(meta["model_ref"])
        recorded = (meta.get("metadata") or {}).get("recipe")
        name = Path(text).stem
        if isinstance(recorded, dict):
            from torchkiln.recipe import validate_recipe

            recipe = validate_recipe(recorded, f"{text} (the recipe it was pruned from)")
            resolved = _recipe_target(recipe, kind, name, source, model=model)
        else:
            resolved = Target(model, name, kind, _own_inputs(model), source=source)
        resolved.model_ref, resolved.model_args = ref.name, dict(ref.args)
    if weights is not None:
        load_weights(resolved.model, weights)
    resolved.model.eval()
    return resolved
