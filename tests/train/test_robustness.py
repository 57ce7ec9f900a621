"""Non-finite losses, early stopping, EMA, FLOPs/MFU reporting, dict batches and model-computed losses."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.train.helpers import make_case
from torchkiln.errors import NonFiniteLossError, RecipeError
from torchkiln.train import evaluate, fit
from torchkiln.zoo import create_dataset, create_model


class PoisonedData(Dataset):
    """Digits-like data where chosen samples carry NaN inputs."""

    def __init__(self, bad: set[int], n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        for i in bad:
            self.x[i] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_nan_loss_is_skipped_and_reported(tmp_path):
    model = torch.nn.Linear(8, 3)
    result = fit(
        model,
        DataLoader(PoisonedData({5}), batch_size=8),
        epochs=1,
        out_dir=str(tmp_path),
        progress="off",
        flops=False,
        log_every=1,
    )
    assert result.nonfinite_losses == 1 and result.steps == 7
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never touched weights
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bad = [e for e in events if e.get("event") == "nonfinite_loss"]
    assert len(bad) == 1 and "epoch 0, micro-batches 0..0" in bad[0]["where"]


def test_too_many_nonfinite_losses_in_a_row_stop_with_a_clear_error():
    model = torch.nn.Linear(8, 3)
    with pytest.raises(
        NonFiniteLossError, match="3 non-finite losses in a row .*epoch 0, micro-batches 2..2"
    ):
        fit(
            model,
            DataLoader(PoisonedData({0, 8, 16}), batch_size=8),
            epochs=1,
            max_nonfinite=3,
            progress="off",
            flops=False,
        )


def test_early_stopping_stops():
    torch.manual_seed(0)
    data = create_dataset("synthetic", "train", n=64, features=8, num_classes=3)
    val = create_dataset("synthetic", "val", n=64, features=8, num_classes=3)
    model = torch.nn.Linear(8, 3)
    # lr so small that validation loss cannot improve by min_delta: stops after `patience` epochs.
    result = fit(
        model,
        data,
        val,
        batch_size=16,
        epochs=20,
        lr=1e-9,
        progress="off",
        flops=False,
        early_stopping={"metric": "val_loss", "patience": 2, "min_delta": 0.1},
    )
    assert result.stopped_early and result.epochs_completed == 3


def test_ema_weights_are_returned_and_evaluated():
    torch.manual_seed(0)
    model, data = make_case("mlp")
    raw = []  # the raw weights after every optimizer step, seen from a callback

    def snapshot(record):
        if "loss" in record:
            raw.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    result = fit(
        model,
        data,
        data,
        batch_size=8,
        epochs=1,
        lr=0.1,
        ema={"decay": 0.9},
        progress="off",
        flops=False,
        log_every=1,
        callbacks=[snapshot],
    )
    assert len(raw) == 6
    expected = dict(raw[0])  # torch's AveragedModel starts from the first update's weights
    for weights in raw[1:]:
        expected = {
            k: 0.9 * expected[k] + 0.1 * weights[k] if weights[k].is_floating_point() else weights[k]
            for k in weights
        }
    for k, v in result.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
    assert result.val_metrics["val_loss"] == pytest.approx(evaluate(model, data)["val_loss"], rel=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "gpt"])
def test_flops_and_mfu_are_reported(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHKILN_CACHE", str(tmp_path))
    import torchkiln.measure.flops as flops_mod

    monkeypatch.setattr(flops_mod, "_measure_gemm_peak", lambda dtype, device: (1e12, 512))
    model, data = make_case(arch)
    result = fit(model, data, batch_size=8, epochs=1, progress="off")
    assert result.flops_per_sample > 0 and result.flops_per_step == pytest.approx(result.flops_per_sample * 8)
    assert result.peak_flops_per_s == 1e12 and 0 < result.mfu < 1


def test_evaluate_reports_perplexity_for_token_level():
    model, data = make_case("gpt")
    metrics = evaluate(model, data, batch_size=16)
    assert set(metrics) == {"val_loss", "val_accuracy", "val_perplexity", "val_items"}
    assert metrics["val_perplexity"] == pytest.approx(
        torch.tensor(metrics["val_loss"]).exp().item(), rel=1e-6
    )


class DictData(Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "labels": self.y[i]}


class KwargModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 2)

    def forward(self, features, labels=None):
        logits = self.lin(features)
        if labels is None:
            return logits
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_dict_batches_with_loss_fn_and_with_model_loss():
    a, b = KwargModel(), KwargModel()
    b.load_state_dict(a.state_dict())
    fit(a, DictData(), batch_size=8, epochs=1, lr=0.1, optimizer="sgd", progress="off", flops=False)
    fit(
        b,
        DictData(),
        batch_size=8,
        epochs=1,
        lr=0.1,
        optimizer="sgd",
        loss="model",
        progress="off",
        flops=False,
    )
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_user_loss_function_by_reference(tmp_path):
    (tmp_path / "myloss.py").write_text(
        "import torch.nn.functional as F\n\n"
        "def smooth(out, y):\n    return F.cross_entropy(out, y, label_smoothing=0.1)\n"
    )
    model, data = make_case("mlp")
    result = fit(
        model,
        data,
        batch_size=8,
        epochs=1,
        loss=f"{tmp_path / 'myloss.py'}:smooth",
        progress="off",
        flops=False,
    )
    assert result.steps == 6


def test_bad_fit_arguments_name_the_key():
    model, data = make_case("mlp")
    with pytest.raises(RecipeError, match="precison: unknown key \\(did you mean 'precision'\\?\\)"):
        fit(model, data, precison="bf16")
    with pytest.raises(RecipeError, match="lr: got -1"):
        fit(model, data, lr=-1)


def test_hf_causal_lm_trains_with_model_loss_and_token_accumulation():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )

    class Tokens(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 32, (24, 16), generator=g)
            self.lengths = torch.randint(4, 17, (24,), generator=g)

        def __len__(self):
            return 24

        def __getitem__(self, i):
            labels = self.ids[i].clone()
            labels[self.lengths[i] :] = -100
            return {"input_ids": self.ids[i], "labels": labels}

    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    small = transformers.GPT2LMHeadModel(config)
    small.load_state_dict(base.state_dict())
    sgd = {"loss": "model", "optimizer": "sgd", "lr": 1.0, "max_steps": 1, "progress": "off", "flops": False}
    fit(base, DataLoader(Tokens(), batch_size=24), **sgd)
    fit(small, DataLoader(Tokens(), batch_size=6), accumulate=4, **sgd)
    for (name, p), q in zip(base.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    result = fit(base, Tokens(), batch_size=8, epochs=3, lr=1e-2, loss="model", progress="off", flops=False)
    assert result.losses[-1] < result.losses[0]
    assert "val_perplexity" in evaluate(base, Tokens(), loss="model")


def test_cnn_gpt_and_mlp_train_from_the_zoo():
    for name, dataset, kw in (
        ("mlp", "digits", {}),
        ("resnet-tiny", "digits", {"layout": "image"}),
        ("gpt-tiny", "synthetic", {"task": "lm", "n": 64, "seq_len": 16, "vocab_size": 32}),
    ):
        data = create_dataset(dataset, "train", **kw)
        args = {"vocab_size": 32, "seq_len": 16, "n_layer": 1, "n_embd": 32} if name == "gpt-tiny" else {}
        model = create_model(name, **args)
        result = fit(model, data, batch_size=32, epochs=5, max_steps=3, progress="off", flops=False)
        assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_progress_bar_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    model, data = make_case("mlp")
    result = fit(
        model,
        data,
        data,
        batch_size=8,
        epochs=2,
        out_dir=str(tmp_path),
        progress="on",
        log_every=2,
        flops=False,
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert all({"lr", "epoch", "skipped_steps"} <= set(r) for r in steps)
    assert sum("val_loss" in r for r in records if "event" not in r) == 2
    assert records[-1]["event"] == "summary" and records[-1]["steps"] == result.steps
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_plain_progress_lines_without_a_terminal(monkeypatch, capsys):
    import torchkiln.train.monitor as monitor

    monkeypatch.setattr(monitor, "PLAIN_EVERY_S", 0.0)
    model, data = make_case("mlp")
    fit(model, data, batch_size=8, epochs=1, progress="auto", flops=False)  # pytest's stderr is no tty
    lines = [line for line in capsys.readouterr().err.splitlines() if " step " in line]
    assert lines and lines[-1].startswith("MLP step 6/6  loss ")
