"""Small models and data shared by the training tests (three architectures)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from torchkiln.zoo import create_model


def make_case(arch: str, n: int = 48, seed: int = 0):
    """``(model, dataset)`` for an MLP, a CNN (BatchNorm) or a transformer LM, all tiny."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if arch == "mlp":
        model = create_model("mlp", in_features=12, hidden=(16, 16), num_classes=3)
        data = TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g))
    elif arch == "cnn":
        model = create_model(
            "resnet-tiny", in_channels=2, num_classes=3, widths=(4, 8), blocks_per_stage=(1, 1)
        )
        data = TensorDataset(torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    elif arch == "gpt":
        model = create_model("gpt-tiny", vocab_size=17, seq_len=8, n_layer=2, n_head=2, n_embd=16, bias=False)
        # (no biases: the key bias gets a mathematically zero gradient that Adam would amplify from noise)
        x = torch.randint(0, 17, (n, 8), generator=g)
        y = torch.randint(0, 17, (n, 8), generator=g)
        # A different number of real (non-ignored) tokens per sample: token-level normalization matters.
        lengths = torch.randint(1, 9, (n,), generator=g)
        y[torch.arange(8)[None, :] >= lengths[:, None]] = -100
        data = TensorDataset(x, y)
    else:
        raise ValueError(arch)
    return model, data


ARCHS = ["mlp", "cnn", "gpt"]


def ce(out, y):
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100)
