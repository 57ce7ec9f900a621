"""Small zoo models shared by the export tests (built once per session, seeded)."""

from __future__ import annotations

import pytest
import torch

import torchkiln as tk

SMALL = {
    "mlp": {"hidden": (32,)},
    "resnet-tiny": {"widths": (8, 16), "blocks_per_stage": (1, 1)},
    "gpt-tiny": {"vocab_size": 64, "seq_len": 16, "n_layer": 2, "n_head": 2, "n_embd": 32},
}


def small_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tk.create_model(name, **SMALL[name])
    if name == "resnet-tiny":
        # Non-trivial BatchNorm statistics and affine parameters, so folding them is really tested.
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exported(model_name, fmt)`` -> (model, ExportResult), each exported once per session."""
    cache: dict[tuple[str, str], tuple[torch.nn.Module, object]] = {}
    root = tmp_path_factory.mktemp("exported")

    def get(name: str, fmt: str):
        key = (name, fmt)
        if key not in cache:
            model = small_model(name)
            result = tk.export(
                model, model.example_inputs(2), root / f"{name}-{fmt}", format=fmt, verbose=False
            )
            cache[key] = (model, result)
        return cache[key]

    return get
