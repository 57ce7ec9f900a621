"""Checkpoints: atomic, weights_only, and resume mid-epoch reproduces the uninterrupted run exactly."""

import copy
import os

import pytest
import torch
from torch.utils.data import DataLoader

from tests.train.helpers import make_case
from torchkiln.errors import CheckpointError
from torchkiln.train import fit, latest_checkpoint, load_checkpoint
from torchkiln.zoo import create_dataset, create_model


class Crash(Exception):
    pass


def _crash_at(step):
    def callback(record):
        if record.get("step") == step and "loss" in record:
            raise Crash(step)

    return callback


COMMON = {"epochs": 3, "lr": 3e-3, "progress": "off", "flops": False, "log_every": 1, "checkpoint_every": 2}


def _model():
    torch.manual_seed(0)
    return create_model(
        "mlp", in_features=64, hidden=(32,), num_classes=10, dropout=0.3
    )  # dropout: RNG matters


@pytest.mark.parametrize("loader_kind", ["dataset", "user_loader"])
def test_resume_mid_epoch_reproduces_losses(tmp_path, loader_kind):
    data = create_dataset("digits", "train")
    data = torch.utils.data.Subset(data, range(200))

    def train_data():
        if loader_kind == "dataset":
            return data  # fit builds a resumable, seeded sampler
        return DataLoader(data, batch_size=16, shuffle=True)  # replayed with the epoch-start RNG

    full = fit(_model(), train_data(), batch_size=16, accumulate=2, out_dir=str(tmp_path / "a"), **COMMON)
    assert full.steps == 3 * 7

    with pytest.raises(Crash):
        fit(
            _model(),
            train_data(),
            batch_size=16,
            accumulate=2,
            out_dir=str(tmp_path / "b"),
            callbacks=[_crash_at(11)],
            **COMMON,
        )
    last = latest_checkpoint(tmp_path / "b")
    assert last is not None and last.name == "step-00000010.pt"  # mid-epoch 2 (steps 8..14)

    resumed = fit(
        _model(),
        train_data(),
        batch_size=16,
        accumulate=2,
        out_dir=str(tmp_path / "b"),
        resume="auto",
        **COMMON,
    )
    assert resumed.steps == full.steps
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_checkpoint_contents_and_weights_only(tmp_path):
    model, data = make_case("cnn")
    fit(
        model,
        data,
        batch_size=8,
        epochs=1,
        precision="fp16",
        ema={"decay": 0.9},
        out_dir=str(tmp_path),
        progress="off",
        flops=False,
    )
    path = latest_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)  # must load without unpickling arbitrary objects
    assert {"model", "optimizer", "scaler", "ema", "state", "rng", "config"} <= set(ckpt)
    assert ckpt["scaler"]["scale"] > 0
    assert set(ckpt["model"]) == set(model.state_dict())
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    assert (tmp_path / "model.pt").exists() and (tmp_path / "metrics.jsonl").exists()


def test_keeps_only_the_newest_checkpoints(tmp_path):
    model, data = make_case("mlp")
    fit(
        model,
        data,
        batch_size=4,
        epochs=1,
        checkpoint_every=2,
        keep_checkpoints=2,
        out_dir=str(tmp_path),
        progress="off",
        flops=False,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000010.pt", "step-00000012.pt"]


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.pt"):
        load_checkpoint(bad)
    model, data = make_case("mlp")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a torchkiln training checkpoint"):
        fit(model, data, resume=tmp_path / "foreign.pt", progress="off", flops=False)
    with pytest.raises(CheckpointError, match="not found"):
        fit(model, data, resume=tmp_path / "missing.pt", progress="off", flops=False)


def test_resume_into_a_different_model_names_the_keys(tmp_path):
    model, data = make_case("mlp")
    fit(model, data, batch_size=8, epochs=1, out_dir=str(tmp_path), progress="off", flops=False)
    other, _ = make_case("cnn")
    with pytest.raises(CheckpointError, match="does not match"):
        fit(other, data, resume="auto", out_dir=str(tmp_path), progress="off", flops=False)


@pytest.mark.slow
def test_compiled_model_saves_original_keys(tmp_path):
    model, data = make_case("mlp", n=16)
    keys = set(copy.deepcopy(model).state_dict())
    fit(
        model,
        data,
        batch_size=8,
        epochs=1,
        compile={"mode": "default"},
        out_dir=str(tmp_path),
        progress="off",
        flops=False,
    )
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved) == keys
    assert not any(
        k.startswith(("_orig_mod.", "module.")) for k in load_checkpoint(latest_checkpoint(tmp_path))["model"]
    )
