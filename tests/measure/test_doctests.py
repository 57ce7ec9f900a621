"""The examples in the measure modules' docstrings run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["env", "flops", "memory", "timing"])
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHKILN_CACHE", str(tmp_path))
    module = importlib.import_module(f"torchkiln.measure.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
