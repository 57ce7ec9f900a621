"""The zoo's public API: names, registration, argument checking, and the docstring examples."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
from torch import nn

import torchkiln.zoo
from torchkiln.errors import KilnError, RecipeError, UserCodeError
from torchkiln.zoo import (
    check_dataset_args,
    check_model_args,
    create_dataset,
    create_model,
    list_models,
    model_entry,
    register_dataset,
    register_model,
)


def test_list_models() -> None:
    assert list_models() == ["gpt-tiny", "mlp", "resnet-tiny"]
    assert list_models("*-tiny") == ["gpt-tiny", "resnet-tiny"]
    assert list_models("nothing*") == []
    assert model_entry("mlp").description.startswith("Multi-layer perceptron")


def test_unknown_model_lists_and_suggests() -> None:
    with pytest.raises(
        KilnError, match=r"unknown model 'resnet_tiny'\. Did you mean 'resnet-tiny'\?"
    ) as info:
        create_model("resnet_tiny")
    assert "Available models: gpt-tiny, mlp, resnet-tiny" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(KilnError, match="unknown dataset 'digit'. Did you mean 'digits'"):
        create_dataset("digit")


def test_check_model_args_unknown_and_suggest() -> None:
    check_model_args("mlp", {"hidden": (8,), "num_classes": 3})
    with pytest.raises(
        ValueError, match=r"model 'mlp': unknown argument 'hiden' \(did you mean 'hidden'\?\)"
    ) as info:
        check_model_args("mlp", {"hiden": (8,)})
    assert "accepted: in_features=64, hidden=(256, 256), num_classes=10, dropout=0.0, norm=True" in str(
        info.value
    )
    with pytest.raises(ValueError, match=r"unknown arguments 'n_layers', 'foo' \(did you mean 'n_layer' for"):
        check_model_args("gpt-tiny", {"n_layers": 2, "foo": 1})


def test_check_model_args_does_not_build(monkeypatch: pytest.MonkeyPatch, restore_registries: None) -> None:
    built = []

    @register_model("probe")
    def probe(width: int, scale: float = 1.0) -> nn.Module:
        """A probe."""
        built.append(width)
        return nn.Linear(width, 1)

    check_model_args("probe", {"width": 3})
    assert built == []
    with pytest.raises(
        ValueError, match=r"model 'probe': arguments \[\] do not fit: missing a required argument"
    ):
        check_model_args("probe", {})
    assert create_model("probe", width=2).in_features == 2 and built == [2]


def test_create_model_checks_args_first() -> None:
    with pytest.raises(RecipeError, match="unknown argument 'widths'"):
        create_model("mlp", widths=(3,))


def test_check_reference_args(tmp_path: Path, in_tmp_cwd: Path) -> None:
    (tmp_path / "m.py").write_text(
        "from torch import nn\n"
        "def make(width: int = 2):\n    return nn.Linear(width, 1)\n"
        "def anything(**kw):\n    return nn.Linear(1, 1)\n"
    )
    check_model_args("m.py:make", {"width": 3})
    check_model_args("m.py:anything", {"whatever": 3})
    with pytest.raises(
        ValueError, match=r"model reference 'm.py:make': unknown argument 'depth'; accepted: width=2"
    ):
        check_model_args("m.py:make", {"depth": 3})
    with pytest.raises(UserCodeError, match="no such file"):
        check_model_args("missing.py:make", {})


def test_check_dataset_args() -> None:
    check_dataset_args("digits", {"layout": "image", "split": "val"})
    check_dataset_args("pycode", {"seq_len": 64, "max_bytes": 1000})
    with pytest.raises(ValueError, match="unknown split 'dev'; accepted splits: train, val, test"):
        check_dataset_args("digits", {"split": "dev"})
    with pytest.raises(ValueError, match="unknown argument 'seqlen'.*did you mean 'seq_len'"):
        check_dataset_args("pycode", {"seqlen": 64})
    with pytest.raises(ValueError, match="task='vision' is not accepted; expected one of 'classification'"):
        check_dataset_args("synthetic", {"task": "vision"})
    with pytest.raises(ValueError, match="unknown argument 'spilt' \\(did you mean 'split'\\?\\)"):
        create_dataset("digits", split="train", **{"spilt": "val"})


def test_register_rules(restore_registries: None) -> None:
    with pytest.raises(RecipeError, match="without ':'"):
        register_model("a:b")
    with pytest.raises(RecipeError, match="already registered by torchkiln.zoo.models.mlp"):

        @register_model("mlp")
        def other_mlp() -> nn.Module:
            return nn.Identity()

    @register_dataset("two-splits", splits=("train", "test"))
    def two_splits(split: str = "train") -> list[tuple[int, int]]:
        """Two splits only."""
        return [(0, 1)]

    assert create_dataset("two-splits", split="test") == [(0, 1)]
    with pytest.raises(
        RecipeError, match="dataset 'two-splits': unknown split 'val'; accepted splits: train, test"
    ):
        create_dataset("two-splits", split="val")


def test_factory_errors_get_a_note(restore_registries: None) -> None:
    @register_model("fails")
    def fails(width: int = 1) -> nn.Module:
        raise RuntimeError("inner problem")

    with pytest.raises(RuntimeError, match="inner problem") as info:
        create_model("fails", width=4)
    notes = getattr(info.value, "__notes__", ["while building model 'fails' with arguments {'width': 4}"])
    assert "while building model 'fails' with arguments {'width': 4}" in notes


@pytest.mark.parametrize(
    "module",
    [
        "torchkiln.zoo",
        "torchkiln.zoo.models",
        "torchkiln.zoo.datasets",
        "torchkiln.zoo.refs",
        "torchkiln.zoo.registry",
    ],
)
def test_docstring_examples(module: str, cache: Path) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_package_reexports() -> None:
    import torchkiln as tk

    assert tk.create_model is torchkiln.zoo.create_model
    assert tk.load_reference is torchkiln.zoo.load_reference


def test_dataset_reference_must_accept_split(in_tmp_cwd: Path) -> None:
    (in_tmp_cwd / "d.py").write_text("def data(n: int = 3):\n    return [(0, 0)] * n\n")
    with pytest.raises(ValueError, match=r"reference 'd.py:data': the factory must accept .*'split'"):
        create_dataset("d.py:data")
