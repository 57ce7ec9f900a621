"""Fixtures for the zoo tests: a private cache directory and a registry that is restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from torchkiln.zoo.registry import DATASETS, MODELS


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TORCHKILN_CACHE`` pointing at an empty temporary directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TORCHKILN_CACHE", str(path))
    return path


@pytest.fixture
def restore_registries() -> Iterator[None]:
    """Undo any registration a test makes."""
    saved = dict(MODELS._entries), dict(DATASETS._entries)
    yield
    MODELS._entries.clear()
    MODELS._entries.update(saved[0])
    DATASETS._entries.clear()
    DATASETS._entries.update(saved[1])


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test with ``tmp_path`` as the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
