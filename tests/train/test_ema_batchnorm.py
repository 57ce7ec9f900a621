"""EMA with BatchNorm: the averaged weights get running statistics re-estimated for them."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import torchkiln as tk
from torchkiln.train.ema import BatchNormRefresher, has_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_refresh_matches_swa_update_bn_and_keeps_modes() -> None:
    batches = [torch.randn(32, 6) * (i + 1) + i for i in range(5)]
    ours, ref = _net(), _net()
    refresher = BatchNormRefresher(batches=3)
    for x in batches:
        refresher.remember((x,), {})
    ours.eval()
    assert refresher.refresh(ours) == 3
    update_bn([x for x in batches[-3:]], ref)  # the last three, cumulative average
    torch.testing.assert_close(ours[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var)
    assert not ours.training and not ours[3].training and ours[1].momentum == 0.1
    assert has_batchnorm(ours) and not has_batchnorm(nn.Linear(2, 2))


def test_fit_with_ema_refreshes_batchnorm_statistics() -> None:
    train = tk.create_dataset("digits", "train", layout="image")
    kwargs = dict(
        epochs=2,
        batch_size=64,
        lr=0.05,
        optimizer={"name": "sgd", "momentum": 0.9},
        progress="off",
        tensorboard=False,
        seed=0,
    )
    refreshed = tk.create_model("resnet-tiny", widths=(8, 16), blocks_per_stage=(1, 1))
    averaged = copy.deepcopy(refreshed)
    tk.fit(refreshed, train, ema={"decay": 0.9}, **kwargs)
    tk.fit(averaged, train, ema={"decay": 0.9, "bn_batches": 0}, **kwargs)
    # the same weights (same seed and data); only the BatchNorm statistics differ
    w = [n for n, _ in refreshed.named_parameters()]
    for name in w:
        torch.testing.assert_close(
            dict(refreshed.named_parameters())[name], dict(averaged.named_parameters())[name]
        )
    bn_a = [m for m in refreshed.modules() if isinstance(m, nn.BatchNorm2d)][0]
    bn_b = [m for m in averaged.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert not torch.allclose(bn_a.running_var, bn_b.running_var)
    assert int(bn_a.num_batches_tracked) == 8  # re-estimated on the last 8 micro-batches
