"""bf16 and fp16 (GradScaler) paths run and learn on the real digits, on three architectures' worth of
layers; the fp16 order unscale -> clip -> step -> update is respected."""

import pytest
import torch

from torchkiln.train import Precision, fit
from torchkiln.zoo import create_dataset, create_model


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precisions_learn_digits(precision):
    torch.manual_seed(0)
    train, val = create_dataset("digits", "train"), create_dataset("digits", "val")
    model = create_model("mlp", in_features=64, hidden=(64,), num_classes=10)
    result = fit(
        model,
        train,
        val,
        batch_size=64,
        epochs=4,
        lr=3e-3,
        precision=precision,
        clip={"norm": 1.0},
        progress="off",
        flops=False,
    )
    assert result.val_metrics["val_accuracy"] > 0.85, result.val_metrics
    assert result.losses[-1] < result.losses[0] / 3


def test_bf16_cnn_channels_last_learns():
    torch.manual_seed(0)
    train = create_dataset("digits", "train", layout="image")
    val = create_dataset("digits", "val", layout="image")
    model = create_model(
        "resnet-tiny", in_channels=1, num_classes=10, widths=(8, 16), blocks_per_stage=(1, 1)
    )
    result = fit(
        model,
        train,
        val,
        batch_size=32,
        epochs=4,
        lr=1e-2,
        precision="bf16",
        channels_last=True,
        progress="off",
        flops=False,
    )
    assert result.val_metrics["val_accuracy"] > 0.8, result.val_metrics


def test_fp16_unscale_once_then_clip_then_step(monkeypatch):
    """With accumulation 3, unscale_ runs once per optimizer step, before clipping sees the gradients."""
    events = []
    real_unscale = torch.amp.GradScaler.unscale_
    real_clip = torch.nn.utils.clip_grad_norm_

    def unscale(self, opt):
        events.append("unscale")
        return real_unscale(self, opt)

    def clip(params, max_norm, **kw):
        params = list(params)
        # Gradients must already be unscaled: their magnitude is that of the fp32 loss, not 65536x larger.
        events.append(("clip", max(float(p.grad.abs().max()) for p in params if p.grad is not None)))
        return real_clip(params, max_norm, **kw)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", unscale)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    data = create_dataset("synthetic", "train", task="classification", n=48, features=8, num_classes=3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    result = fit(
        model,
        data,
        batch_size=4,
        accumulate=3,
        epochs=1,
        precision="fp16",
        clip={"norm": 1.0},
        progress="off",
        flops=False,
    )
    assert result.steps == 4
    assert [e if e == "unscale" else e[0] for e in events] == ["unscale", "clip"] * 4
    assert all(e[1] < 100 for e in events if e != "unscale")


def test_precision_object():
    p = Precision("fp16", "cpu")
    assert p.scaler is not None and p.state_dict()["scale"] == 2.0**16
    assert Precision("fp32", "cpu").scaler is None
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision("int8", "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_learns(precision):
    torch.manual_seed(0)
    train, val = create_dataset("digits", "train"), create_dataset("digits", "val")
    model = create_model("mlp", in_features=64, hidden=(64,), num_classes=10)
    result = fit(
        model,
        train,
        val,
        batch_size=64,
        epochs=4,
        lr=3e-3,
        precision=precision,
        device="cuda",
        progress="off",
        flops=False,
    )
    assert result.val_metrics["val_accuracy"] > 0.85


def test_flash_fp32_attention_under_bf16_autocast_matches_fp32_attention():
    """auto on CPU + bf16 computes attention in fp32 (flash kernel): outputs and gradients match fp32."""
    from torchkiln.train.precision import sdpa_context

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref.sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    with sdpa_context("auto", "bf16", "cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True
        )
        other = torch.ones(2, 2) @ torch.ones(2, 2)  # other ops pass through the mode unchanged
    assert out.dtype == torch.bfloat16 and other.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_bf16_gpt_learns_with_auto_attention():
    torch.manual_seed(0)
    data = create_dataset("synthetic", "train", task="lm", n=256, seq_len=32, vocab_size=32)
    model = create_model("gpt-tiny", vocab_size=32, seq_len=32, n_layer=2, n_embd=32, n_head=2)
    result = fit(model, data, batch_size=32, epochs=4, lr=3e-3, precision="bf16", progress="off", flops=False)
    assert result.losses[-1] < 0.7 * result.losses[0]
