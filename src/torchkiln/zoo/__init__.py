"""Built-in models and datasets by name, and user code by reference (``pkg.mod:fn``, ``file.py:fn``).

>>> from torchkiln.zoo import create_dataset, create_model, list_models
>>> list_models("*-tiny")
['gpt-tiny', 'resnet-tiny']
>>> data = create_dataset("digits", split="train")
>>> model = create_model("mlp", in_features=64, num_classes=data.num_classes)
>>> model(data[0][0].unsqueeze(0)).shape
torch.Size([1, 10])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from torchkiln.errors import RecipeError, UserCodeError
from torchkiln.zoo import datasets as _datasets  # noqa: F401  (registers the built-in datasets)
from torchkiln.zoo import models as _models  # noqa: F401  (registers the built-in models)
from torchkiln.zoo.refs import is_reference, load_reference
from torchkiln.zoo.registry import DATASETS, MODELS, SPLITS, Entry

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "check_model_args",
    "model_entry",
    "create_dataset",
    "list_datasets",
    "register_dataset",
    "check_dataset_args",
    "dataset_entry",
    "load_reference",
    "is_reference",
    "SPLITS",
    "Entry",
]


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(text)


# ------------------------------------------------------------------------------------------ models


def register_model(
    name: str, *, description: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a model factory under ``name`` (description: the docstring's first line).

    >>> @register_model("my-linear")
    ... def my_linear(in_features: int = 4, num_classes: int = 2):
    ...     '''A single linear layer.'''
    ...     return nn.Linear(in_features, num_classes)
    >>> create_model("my-linear", in_features=3).in_features
    3
    >>> from torchkiln.zoo.registry import MODELS; MODELS._unregister("my-linear")
    """
    return MODELS.register(name, description=description)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching the fnmatch ``pattern``.

    >>> list_models()
    ['gpt-tiny', 'mlp', 'resnet-tiny']
    """
    return MODELS.names(pattern)


def model_entry(name: str) -> Entry:
    """The registry entry (factory, description) of a registered model."""
    return MODELS.entry(name)


def check_model_args(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` (:class:`~torchkiln.errors.RecipeError`) if ``kwargs`` do not fit the model
    factory's signature, without building the model. References are imported to read their
    signature (import problems raise :class:`~torchkiln.errors.UserCodeError`).

    >>> check_model_args("mlp", {"hiden": (64,)})
    Traceback (most recent call last):
    ...
    torchkiln.errors.RecipeError: model 'mlp': unknown argument 'hiden' (did you mean 'hidden'?); \
accepted: in_features=64, hidden=(256, 256), num_classes=10, dropout=0.0, norm=True
    """
    MODELS.check_args(name, kwargs)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, or call a user factory given as ``pkg.mod:fn`` / ``path/file.py:fn``.

    Keyword arguments go to the factory; they are checked against its signature first. The
    factory must return a ``torch.nn.Module``.

    >>> create_model("gpt-tiny", n_layer=2, seq_len=32).seq_len
    32
    """
    factory, label = MODELS.resolve(name)
    MODELS.check_args(name, kwargs)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        _note(exc, f"while building {label} with arguments {kwargs}")
        raise
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"{label} returned {type(model).__name__}, expected torch.nn.Module")
    return model


# ---------------------------------------------------------------------------------------- datasets


def register_dataset(
    name: str, *, splits: tuple[str, ...] = SPLITS, description: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a dataset factory ``fn(split=..., **kwargs) -> Dataset`` under ``name``."""
    return DATASETS.register(name, splits=splits, description=description)


def list_datasets(pattern: str = "*") -> list[str]:
    """Sorted names of registered datasets matching the fnmatch ``pattern``.

    >>> list_datasets()
    ['digits', 'pycode', 'synthetic']
    """
    return DATASETS.names(pattern)


def dataset_entry(name: str) -> Entry:
    """The registry entry (factory, description, splits) of a registered dataset."""
    return DATASETS.entry(name)


def _check_split(name: str, split: str) -> None:
    accepted = DATASETS.entry(name).splits if name in DATASETS.names() else SPLITS
    if split not in accepted:
        raise RecipeError(
            f"dataset {name!r}: unknown split {split!r}; accepted splits: {', '.join(accepted)}"
        )


def check_dataset_args(name: str, kwargs: dict[str, Any]) -> None:
    """Like :func:`check_model_args` for datasets; a ``split`` key in ``kwargs`` is checked too.

    >>> check_dataset_args("digits", {"layout": "square"})
    Traceback (most recent call last):
    ...
    torchkiln.errors.RecipeError: dataset 'digits': argument layout='square' is not accepted; \
expected one of 'flat', 'image'
    """
    kwargs = dict(kwargs)
    split = kwargs.pop("split", "train")
    if _packed_path(name, "train") is not None:
        return  # a packed dataset on disk; its files are validated when opened
    DATASETS.resolve(name)
    _check_split(name, split)
    DATASETS.check_args(name, kwargs, fixed={"split": split})


def _packed_path(name: str, split: str) -> str | None:
    """The stem of a packed indexed dataset named by ``name`` (a path), or None for registry names."""
    import os

    if not isinstance(name, (str, os.PathLike)):
        return None
    text = os.fspath(name)
    single = text.endswith((".idx", ".bin")) or os.path.isfile(text + ".idx")
    if single:
        if split != "train":
            # One packed file is one split: evaluating on it would silently evaluate on training data.
            raise RecipeError(
                f"packed dataset {text!r} is a single file, so it has no {split!r} split; pack a directory "
                f"with train.idx/{split}.idx (kiln data pack ... -o DIR/{split}) or set data.val_split='none'"
            )
        return text
    if os.path.isdir(text):
        packed = sorted(f for f in os.listdir(text) if f.endswith(".idx"))
        if f"{split}.idx" in packed:
            return os.path.join(text, split)
        if packed:  # a packed-dataset directory without this split
            raise RecipeError(
                f"packed dataset directory {text!r} has no {split}.idx (it has {', '.join(packed)}); "
                f"pack that split too or set data.val_split='none'"
            )
    return None


def create_dataset(name: str, split: str = "train", **kwargs: Any) -> Dataset:
    """Build split ``split`` ("train", "val" or "test") of a registered dataset or a user factory
    given by reference (called as ``fn(split=split, **kwargs)``; it must return a map-style dataset).

    >>> ds = create_dataset("synthetic", split="val", n=16, features=8)
    >>> len(ds), ds[0][0].shape, ds.num_classes
    (16, torch.Size([8]), 10)

    A packed dataset (``kiln data pack``) is named by path: its stem ``data/corpus`` (for
    ``data/corpus.idx`` + ``data/corpus.bin``), either file, or a directory holding
    ``<split>.idx``/``<split>.bin``; keyword arguments go to :class:`torchkiln.data.IndexedDataset`.
    """
    packed = _packed_path(name, split)
    if packed is not None:
        from torchkiln.data.indexed import IndexedDataset

        return IndexedDataset(packed, **kwargs)
    factory, label = DATASETS.resolve(name)
    _check_split(name, split)
    DATASETS.check_args(name, kwargs, fixed={"split": split})
    try:
        dataset = factory(split=split, **kwargs)
    except Exception as exc:
        _note(exc, f"while building {label} split {split!r} with arguments {kwargs}")
        raise
    if not isinstance(dataset, Dataset) and not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    ):
        raise UserCodeError(
            f"{label} returned {type(dataset).__name__}, expected a torch.utils.data.Dataset "
            "(or any object with __getitem__ and __len__)"
        )
    return dataset
