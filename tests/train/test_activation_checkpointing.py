"""Activation checkpointing: the same gradients, fewer bytes saved for backward, unchanged keys."""

import copy

import pytest
import torch

from tests.train.helpers import ARCHS, ce, make_case
from torchkiln.measure import saved_tensor_bytes
from torchkiln.train import apply_activation_checkpointing, find_blocks, fit, remove_activation_checkpointing


def _grads_and_saved(model, x, y):
    model.zero_grad()
    stats = saved_tensor_bytes(lambda: ce(model(x), y))
    stats.result.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats.bytes


@pytest.mark.parametrize("arch", ARCHS)
def test_same_gradients_less_saved_memory(arch):
    model, data = make_case(arch, n=8)
    x, y = data[:8]
    ref = copy.deepcopy(model)
    g_ref, bytes_ref = _grads_and_saved(ref, x, y)
    chosen = apply_activation_checkpointing(model)
    assert chosen, "blocks were auto-detected"
    g, saved = _grads_and_saved(model, x, y)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved < bytes_ref
    assert set(model.state_dict()) == set(ref.state_dict())  # no wrapper prefixes


def test_gpt_every_block_halves_activation_memory():
    model, data = make_case("gpt", n=8)
    x, y = data[:8]
    base = saved_tensor_bytes(lambda: ce(model(x), y)).bytes
    blocks = apply_activation_checkpointing(model, modules=["Block"], every=1)
    assert [n for n, _ in blocks] == ["blocks.0", "blocks.1"]
    assert saved_tensor_bytes(lambda: ce(model(x), y)).bytes <= 0.5 * base


def test_policy_every_n_and_by_type_and_undo():
    model, _ = make_case("gpt")
    assert [n for n, _ in find_blocks(model)] == ["blocks.0", "blocks.1"]
    assert [n for n, _ in apply_activation_checkpointing(model, every=2)] == ["blocks.0"]
    assert remove_activation_checkpointing(model) == 1
    with pytest.raises(ValueError, match="no module of class \\['Nope'\\]"):
        apply_activation_checkpointing(model, modules=["Nope"])


def test_checkpointed_model_deepcopies_and_trains_with_ema():
    model, data = make_case("cnn")
    result = fit(
        model,
        data,
        batch_size=8,
        epochs=1,
        activation_checkpointing={"modules": ["ResidualBlock"]},
        ema={"decay": 0.5},
        progress="off",
        flops=False,
    )
    assert result.steps == 6
    assert "forward" not in model.blocks[0].__dict__  # removed after training
    copy.deepcopy(model)
