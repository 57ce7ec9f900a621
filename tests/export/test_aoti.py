"""AOTInductor: one slow test (a C++ compile takes tens of seconds here)."""

from __future__ import annotations

import pytest
import torch

import torchkiln as tk
from torchkiln.export import aoti_unavailable_reason, load_predictor

from .conftest import small_model


@pytest.mark.slow
def test_aoti_package_verifies_and_round_trips(tmp_path) -> None:
    reason = aoti_unavailable_reason()
    if reason:
        pytest.skip(reason)
    model = small_model("resnet-tiny")
    result = tk.export(model, model.example_inputs(2), tmp_path / "r.pt2", format="aoti", verbose=False)
    assert result.ok and sorted({c.batch_size for c in result.checks}) == [1, 2, 5]
    assert len(result.fused) == 6
    assert any("thread" in n for n in result.notes)
    predictor = load_predictor(result.path)
    assert predictor.format == "aoti" and predictor.metadata["threads"] == torch.get_num_threads()
    x = model.example_inputs(7)
    torch.testing.assert_close(predictor(*x), model(*x).detach(), atol=1e-4, rtol=1e-3)
