"""Every public module's docstring examples run (they are the documentation's examples)."""

import doctest
import importlib

import pytest

MODULES = [
    "torchkiln",
    "torchkiln.recipe",
    "torchkiln.train.schedule",
    "torchkiln.train.optim",
    "torchkiln.train.precision",
    "torchkiln.train.activation_checkpointing",
    "torchkiln.train.checkpoint",
    "torchkiln.train.loss",
    "torchkiln.train.sampling",
    "torchkiln.train.loop",
    "torchkiln.train.from_recipe",
    "torchkiln.data.sampler",
    "torchkiln.data.collate",
    "torchkiln.data.indexed",
    "torchkiln.compress.registry",
    "torchkiln.compress.compare",
    "torchkiln.compress.quantize",
    "torchkiln.compress.outliers",
    "torchkiln.compress.sensitivity",
    "torchkiln.compress.prune",
    "torchkiln.compress.distill",
    "torchkiln.compress.sparse",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0 or name == "torchkiln.train.from_recipe"
