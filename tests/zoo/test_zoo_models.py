"""Built-in models: every registered model builds, runs forward and backward; model-specific checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchkiln.zoo import create_model, list_models
from torchkiln.zoo.models import GPT, MLP, Block, CausalSelfAttention, ResidualBlock, ResNetTiny

# Small configurations so the whole file runs in a few seconds; defaults are exercised by test_defaults.
SMALL = {
    "mlp": {"hidden": (32, 32)},
    "resnet-tiny": {"widths": (8, 16, 16)},
    "gpt-tiny": {"n_layer": 2, "n_embd": 32, "seq_len": 16, "vocab_size": 64},
}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **SMALL.get(name, {}))
    assert isinstance(model, nn.Module)
    inputs = model.example_inputs(3)
    out = model(*inputs)
    assert out.shape[0] == 3
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_defaults_build(name: str) -> None:
    model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert 10_000 < n < 5_000_000


def test_mlp_shapes_and_options() -> None:
    model = create_model("mlp", in_features=64, hidden=(16,), num_classes=7, dropout=0.1, norm=False)
    assert isinstance(model, MLP)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 7)
    assert any(isinstance(m, nn.LayerNorm) for m in create_model("mlp").modules())
    with pytest.raises(ValueError, match="expects inputs with 64 features.*in_features=12"):
        model(torch.rand(2, 12))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_resnet_tiny_image_sizes(shape: tuple[int, int, int]) -> None:
    model = create_model("resnet-tiny", in_channels=shape[0], widths=(8, 16, 32), blocks_per_stage=(2, 1, 1))
    assert isinstance(model, ResNetTiny)
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_resnet_tiny_blocks_container() -> None:
    model = create_model("resnet-tiny", widths=(8, 16, 32), blocks_per_stage=(2, 1, 1))
    assert isinstance(model.blocks, nn.Sequential)
    assert len(model.blocks) == 4 and all(isinstance(b, ResidualBlock) for b in model.blocks)
    # stride 2 between stages: projection shortcuts exactly where the shape changes
    kinds = [type(b.shortcut).__name__ for b in model.blocks]
    assert kinds == ["Identity", "Identity", "Sequential", "Sequential"]
    with pytest.raises(ValueError, match="same length"):
        create_model("resnet-tiny", widths=(8, 16), blocks_per_stage=(1,))
    with pytest.raises(ValueError, match=r"\(batch, 1, height, width\)"):
        model(torch.rand(2, 3, 8, 8))


def test_gpt_structure_and_init() -> None:
    torch.manual_seed(0)
    model = create_model("gpt-tiny", n_layer=4, n_embd=64, seq_len=32)
    assert isinstance(model, GPT)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 4
    assert all(isinstance(b, Block) and isinstance(b.attn, CausalSelfAttention) for b in model.blocks)
    assert model.lm_head.weight is model.tok_emb.weight  # tied
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    proj_std = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks]).std().item()
    assert proj_std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)
    assert model(torch.randint(0, 256, (2, 32))).shape == (2, 32, 256)


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = create_model("gpt-tiny", n_layer=2, n_embd=32, seq_len=16, vocab_size=64).eval()
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt_too_long_sequence() -> None:
    model = create_model("gpt-tiny", n_layer=1, n_embd=32, seq_len=8)
    with pytest.raises(ValueError, match="length 9 but was built with seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt_padding_does_not_change_real_positions(side: str) -> None:
    torch.manual_seed(0)
    model = create_model("gpt-tiny", n_layer=2, n_embd=32, seq_len=16, vocab_size=64).eval()
    real = torch.randint(1, 64, (1, 10))
    pad = torch.zeros(1, 6, dtype=torch.long)
    with torch.no_grad():
        ref = model(real)
        ones, zeros = torch.ones(1, 10), torch.zeros(1, 6)
        if side == "left":
            idx, mask = torch.cat([pad, real], 1), torch.cat([zeros, ones], 1)
        else:
            idx, mask = torch.cat([real, pad], 1), torch.cat([ones, zeros], 1)
        # batch it with an unpadded row so the mask really differs per row
        other = torch.randint(0, 64, (1, 16))
        out = model(torch.cat([idx, other]), attention_mask=torch.cat([mask, torch.ones(1, 16)]))
    assert torch.isfinite(out).all()  # fully padded rows stay finite
    got = out[0, 6:] if side == "left" else out[0, :10]
    torch.testing.assert_close(got, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(other)[0].detach(), atol=1e-5, rtol=1e-5)


def test_gpt_mask_shape_error() -> None:
    model = create_model("gpt-tiny", n_layer=1, n_embd=32, seq_len=8)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(torch.zeros(2, 8, dtype=torch.long), attention_mask=torch.ones(2, 7))


def test_gpt_bias_false_and_head_check() -> None:
    model = create_model("gpt-tiny", n_layer=1, n_embd=32, seq_len=8, bias=False)
    assert all(m.bias is None for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))
    with pytest.raises(ValueError, match="divisible by n_head=3"):
        create_model("gpt-tiny", n_embd=32, n_head=3)
