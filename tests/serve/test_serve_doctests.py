"""The serve modules' docstring examples run."""

import doctest
import importlib

import pytest

MODULES = [
    "torchkiln.serve.batcher",
    "torchkiln.serve.model",
    "torchkiln.serve.codec",
    "torchkiln.serve.loadtest",
    "torchkiln.cli.serve",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
