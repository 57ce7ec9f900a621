"""Resolving user code by reference: ``pkg.mod:attr`` and ``path/file.py:attr``, and each failure."""

from __future__ import annotations

import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchkiln.errors import KilnError, UserCodeError
from torchkiln.zoo import create_dataset, create_model, is_reference, load_reference


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package ``userpkg_<n>`` importable from sys.path, with a model and a dataset factory."""
    name = f"userpkg_{abs(hash(str(tmp_path))) % 10**8}"
    write(tmp_path / "site" / name / "__init__.py", "")
    write(
        tmp_path / "site" / name / "nets.py",
        """
        import torch
        from torch import nn

        class Factories:
            @staticmethod
            def linear(width: int = 4):
                return nn.Linear(width, 2)

        def make(width: int = 4, depth: int = 1):
            return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

        def make_int():
            return 3

        def data(split: str = "train", n: int = 5):
            return torch.utils.data.TensorDataset(torch.zeros(n, 2), torch.zeros(n))

        NOT_CALLABLE = 42
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_is_reference() -> None:
    assert is_reference("pkg.mod:fn") and is_reference("a/b.py:Cls.build") and is_reference("C:\\x\\m.py:f")
    assert not is_reference("mlp") and not is_reference("x.py:") and not is_reference(":fn")
    assert not is_reference("pkg:1abc")


def test_module_reference(user_package: str) -> None:
    make = load_reference(f"{user_package}.nets:make", what="model factory", require_callable=True)
    assert callable(make)
    model = create_model(f"{user_package}.nets:make", width=3, depth=2)
    assert isinstance(model, torch.nn.Sequential) and len(model) == 2
    assert create_model(f"{user_package}.nets:Factories.linear", width=5).in_features == 5
    ds = create_dataset(f"{user_package}.nets:data", split="val", n=7)
    assert len(ds) == 7


def test_file_reference_with_sibling_import(in_tmp_cwd: Path) -> None:
    write(in_tmp_cwd / "models" / "helpers.py", "WIDTH = 6\n")
    write(
        in_tmp_cwd / "models" / "net.py",
        """
        from torch import nn
        import helpers  # a sibling module: the file's directory is on sys.path while it loads

        class Net(nn.Module):
            def __init__(self, width=helpers.WIDTH):
                super().__init__()
                self.fc = nn.Linear(width, 1)

        def make(width: int = helpers.WIDTH):
            return Net(width)
        """,
    )
    path_before = list(sys.path)
    model = create_model("models/net.py:make")
    assert model.fc.in_features == 6
    assert sys.path == path_before
    # loaded once: the same module (and class) the second time; absolute paths work too
    again = create_model(f"{in_tmp_cwd / 'models' / 'net.py'}:make", width=2)
    assert type(again) is type(model)
    # instances of classes from a file module pickle (the module is in sys.modules)
    assert type(pickle.loads(pickle.dumps(model))).__name__ == "Net"


def test_module_in_cwd_is_importable(in_tmp_cwd: Path) -> None:
    name = f"cwdmod_{abs(hash(str(in_tmp_cwd))) % 10**8}"
    write(in_tmp_cwd / f"{name}.py", "from torch import nn\ndef make():\n    return nn.ReLU()\n")
    try:
        assert isinstance(create_model(f"{name}:make"), torch.nn.ReLU)
    finally:
        sys.modules.pop(name, None)


def test_error_no_colon() -> None:
    with pytest.raises(UserCodeError, match="has no ':'; expected 'package.module:attribute'"):
        load_reference("just_a_name", what="model factory")


def test_error_bad_attribute_syntax() -> None:
    with pytest.raises(UserCodeError, match="'1x' after ':' is not a .*Python identifier"):
        load_reference("pkg.mod:1x")


def test_error_missing_file(in_tmp_cwd: Path) -> None:
    with pytest.raises(UserCodeError, match=r"model factory file 'nope/net.py' .* no such file") as info:
        create_model("nope/net.py:make")
    assert isinstance(info.value, ImportError) and isinstance(info.value, KilnError)


def test_error_missing_module() -> None:
    with pytest.raises(UserCodeError, match="no module named 'no_such_pkg_xyz'"):
        create_model("no_such_pkg_xyz.models:make")


def test_error_import_failure_in_file(in_tmp_cwd: Path) -> None:
    write(in_tmp_cwd / "broken.py", "x = 1\nraise RuntimeError('boom at import')\n")
    with pytest.raises(UserCodeError, match="broken.py' failed to import: RuntimeError: boom at import"):
        load_reference("broken.py:x")
    write(in_tmp_cwd / "syntax.py", "def f(:\n")
    with pytest.raises(UserCodeError, match="failed to import: SyntaxError"):
        load_reference("syntax.py:f")
    assert not [m for m in sys.modules if m.startswith("torchkiln_user_broken")]


def test_error_import_failure_in_module(user_package: str, tmp_path: Path) -> None:
    write(tmp_path / "site" / user_package / "bad.py", "import no_such_dependency_xyz\n")
    with pytest.raises(
        UserCodeError,
        match=r"importing '.*\.bad' failed: ModuleNotFoundError: No module named 'no_such_dependency",
    ):
        load_reference(f"{user_package}.bad:f")


def test_error_missing_attribute(user_package: str) -> None:
    with pytest.raises(UserCodeError, match=r"has no attribute 'mak'; did you mean 'make'") as info:
        create_model(f"{user_package}.nets:mak")
    assert "make_int" in str(info.value)  # the available names are listed
    with pytest.raises(
        UserCodeError, match=r"Factories in module '.*nets' has no attribute 'linar'; did you mean 'linear'"
    ):
        load_reference(f"{user_package}.nets:Factories.linar")


def test_error_not_callable(user_package: str) -> None:
    assert load_reference(f"{user_package}.nets:NOT_CALLABLE") == 42
    with pytest.raises(UserCodeError, match="NOT_CALLABLE' is of type int, not callable"):
        create_model(f"{user_package}.nets:NOT_CALLABLE")


def test_error_wrong_return_type(in_tmp_cwd: Path) -> None:
    write(in_tmp_cwd / "x.py", "def make():\n    return 3\n\ndef data(split):\n    return 3\n")
    with pytest.raises(UserCodeError, match=r"reference 'x.py:make' returned int, expected torch.nn.Module"):
        create_model("x.py:make")
    with pytest.raises(
        UserCodeError, match=r"reference 'x.py:data' returned int, expected a torch.utils.data"
    ):
        create_dataset("x.py:data")


def test_file_reloaded_when_changed(in_tmp_cwd: Path) -> None:
    path = write(in_tmp_cwd / "versioned.py", "VALUE = 1\n")
    assert load_reference("versioned.py:VALUE") == 1
    path.write_text("VALUE = 22\n")
    assert load_reference("versioned.py:VALUE") == 22
