"""A static int8 artifact (``tk.save_quantized``) loads through ``load_predictor`` and ``kiln serve``'s
adapter, lowered to int8 kernels again, with a dynamic batch."""

from __future__ import annotations

import pytest
import torch

import torchkiln as tk
from torchkiln.export import load_predictor


@pytest.fixture(scope="module")
def static_artifact(tmp_path_factory):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = tk.create_model("resnet-tiny", in_channels=3, widths=(16, 32), blocks_per_stage=(1, 1)).eval()
    x = torch.randn(4, 3, 16, 16)
    quantized = tk.quantize(model, tk.Int8Static(calibration=[(x,)], num_batches=1))
    path = tk.save_quantized(quantized, tmp_path_factory.mktemp("q") / "model-int8.pt2")
    return quantized, path, x


def test_load_predictor_runs_the_int8_artifact(static_artifact) -> None:
    quantized, path, x = static_artifact
    predictor = load_predictor(path)
    assert predictor.format == "int8-static"
    assert [s.shape for s in predictor.input_specs] == [(None, 3, 16, 16)]
    with torch.inference_mode():
        torch.testing.assert_close(predictor(x), quantized(x), atol=1e-4, rtol=1e-3)
        assert predictor(torch.randn(7, 3, 16, 16)).shape == (7, 10)


def test_serve_adapter_loads_it(static_artifact) -> None:
    from torchkiln.serve.model import load_served_model

    _, path, x = static_artifact
    served = load_served_model(str(path))
    assert [s.name for s in served.inputs] == [load_predictor(path).input_names[0]]
