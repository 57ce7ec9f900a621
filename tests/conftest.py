"""Shared test set-up: a private cache and inductor directory, few threads, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Keep the pycode corpus cache between sessions (it is deterministic) but give inductor its own dir.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    # Runs recorded by tests never land in the working tree's runs/history.sqlite.
    os.environ["TORCHKILN_HISTORY"] = str(tmp_path_factory.mktemp("history") / "history.sqlite")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
