"""BatchNorm folding: no BatchNorm left where one follows a conv/linear, same outputs; everything else
(models without BN, convs whose output is used twice, shared modules) left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkiln as tk
from torchkiln.export import ExportError
from torchkiln.export.fusion import FuseVerificationError, find_bn_folds, fuse_with_report

from .conftest import small_model


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_resnet_tiny_folds_every_batchnorm() -> None:
    model = small_model("resnet-tiny")
    fused = tk.fuse(model)
    assert fused is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters()) + 200
    for bs in (1, 4):
        x = model.example_inputs(bs, size=16)
        torch.testing.assert_close(fused(*x), model(*x), atol=1e-5, rtol=1e-4)


def test_models_without_batchnorm_are_untouched() -> None:
    for name in ("mlp", "gpt-tiny"):
        model = small_model(name)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert tk.fuse(model) is model
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ConvBNReLU1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, bias=True)
        self.bn = nn.BatchNorm1d(6)
        self.lin = nn.Linear(6 * 6, 5)
        self.bn_lin = nn.BatchNorm1d(5, affine=False)
        self.deconv = nn.ConvTranspose1d(6, 4, 2)
        self.bn_deconv = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn_lin(self.lin(y.flatten(1))), self.bn_deconv(self.deconv(y))


def test_conv1d_linear_and_transposed_conv_fold() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(ConvBNReLU1d())
    x = torch.randn(4, 3, 8)
    result = fuse_with_report(model, (x,))
    assert result.folded == [("conv", "bn"), ("lin", "bn_lin"), ("deconv", "bn_deconv")]
    assert result.max_abs_error is not None and result.max_abs_error < 1e-5
    for got, expected in zip(result.model(x), model(x), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


class Unfoldable(nn.Module):
    """The conv output feeds the BN and a second branch; a shared conv runs twice; a BN on batch stats."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.shared = nn.Conv2d(2, 2, 1)
        self.bn_shared = nn.BatchNorm2d(2)
        self.conv3 = nn.Conv2d(2, 2, 1)
        self.bn_batch_stats = nn.BatchNorm2d(2, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y
        z = self.bn_shared(self.shared(z)) + self.shared(x)
        return self.bn_batch_stats(self.conv3(z))


def test_pairs_that_would_change_the_result_are_not_folded() -> None:
    model = _randomize_bn(Unfoldable())
    x = torch.randn(3, 2, 4, 4)
    assert find_bn_folds(model, (x,)) == []
    assert tk.fuse(model, (x,)) is model


def test_training_mode_is_restored_and_inplace() -> None:
    model = small_model("resnet-tiny").train()
    assert find_bn_folds(model)  # runs in eval mode...
    assert model.training  # ...and puts the model back
    fused = tk.fuse(model, inplace=True)
    assert fused is model and not model.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fuse_without_example_inputs_says_what_to_pass() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ExportError, match="pass example_inputs"):
        tk.fuse(model)
    fused = tk.fuse(model, torch.rand(2, 1, 5, 5))
    assert isinstance(fused[1], nn.Identity)


def test_fuse_verification_catches_a_wrong_fold(monkeypatch) -> None:
    from torchkiln.export import fusion

    real = fusion._fold

    def wrong_fold(producer, bn):
        folded = real(producer, bn)
        with torch.no_grad():
            folded.bias.add_(1.0)
        return folded

    monkeypatch.setattr(fusion, "_fold", wrong_fold)
    with pytest.raises(FuseVerificationError, match="changed the outputs by up to"):
        tk.fuse(small_model("resnet-tiny"))
