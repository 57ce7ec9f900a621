"""The optimize modules' docstring examples run."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "name",
    [
        "torchkiln.optimize.pareto",
        "torchkiln.optimize.candidates",
        "torchkiln.optimize.search",
        "torchkiln.optimize.from_recipe",
    ],
)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
