"""The model adapter: specs from modules, padding and unpadding, model.pt state dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkiln as tk
from torchkiln.errors import KilnError
from torchkiln.serve.model import ServedModel, TensorSpec, load_served_model, specs_from_module


def test_a_kiln_train_state_dict_is_served_with_its_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=[16])
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    served = load_served_model(str(path), model="mlp", model_args={"hidden": [16]})
    x = torch.rand(3, 64)
    out = served.run_batch([{"x": row} for row in x])
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([o["output"] for o in out]), model(x))
    with pytest.raises(KilnError, match="--model"):
        load_served_model(str(path))


def test_specs_from_zoo_modules() -> None:
    gpt = tk.create_model("gpt-tiny", n_layer=1, n_embd=16, seq_len=12, vocab_size=30)
    specs = specs_from_module(gpt)
    assert [(s.name, s.shape, s.max_shape, s.high) for s in specs] == [
        ("idx", (None,), (12,), 30),
        ("attention_mask", (None,), (12,), None),
    ]
    resnet = specs_from_module(tk.create_model("resnet-tiny"))
    assert [(s.name, s.shape) for s in resnet] == [("x", (1, 8, 8))]


def test_batch_padding_to_a_bucket_is_cut_off() -> None:
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x + 1

    served = ServedModel(fn, [TensorSpec("x", torch.float32, (2,))], batch_buckets=(1, 4), pad_batch=True)
    out = served.run_batch([{"x": torch.zeros(2)}, {"x": torch.ones(2)}, {"x": torch.ones(2)}])
    assert calls == [4] and len(out) == 3
    assert out[1]["output"].tolist() == [2.0, 2.0]


def test_sequence_outputs_are_unpadded_pooled_ones_are_not() -> None:
    def fn(ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        hidden = ids.float()[..., None] * attention_mask[..., None]
        return {"tokens": hidden, "pooled": hidden.sum(1)}

    served = ServedModel(
        fn,
        [
            TensorSpec("ids", torch.int64, (None,), max_shape=(8,)),
            TensorSpec("attention_mask", torch.int64, (None,), max_shape=(8,)),
        ],
    )
    served.warmup((1, 2))
    out = served.run_batch([{"ids": torch.tensor([1, 2])}, {"ids": torch.tensor([3, 4, 5, 6])}])
    assert out[0]["tokens"].shape == (2, 1) and out[1]["tokens"].shape == (4, 1)
    assert out[0]["pooled"].tolist() == [3.0] and out[1]["pooled"].tolist() == [18.0]
    assert [s.name for s in served.client_inputs] == ["ids"]


def test_a_missing_artifact_path_is_named_as_missing() -> None:
    from torchkiln.errors import KilnError
    from torchkiln.serve.model import load_served_model

    with pytest.raises(KilnError, match="nothere.onnx: no such file"):
        load_served_model("nothere.onnx")
    with pytest.raises(KilnError, match="no such file"):
        load_served_model("runs/absent/model.pt")


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [("resnet-tiny", {}, (1, 8, 8)), ("mlp", {"hidden": [32, 32]}, (64,))],
)
def test_a_pruned_artifact_serves_and_predicts_its_reshaped_model(
    tmp_path: Path, name, kwargs, shape
) -> None:
    from torchkiln.compress.prune import ChannelPrune, save_pruned

    torch.manual_seed(0)
    x = torch.rand(2, *shape)
    pruned = tk.prune(tk.create_model(name, **kwargs), ChannelPrune(ratio=0.5), example_inputs=x)
    path = save_pruned(pruned, tmp_path / "pruned.pt", model_ref=name, model_args=kwargs)
    batch = torch.rand(3, *shape)
    with torch.no_grad():
        want = pruned.eval()(batch)
    served = load_served_model(str(path))
    out = served.run_batch([{"x": row} for row in batch])
    torch.testing.assert_close(torch.stack([o["output"] for o in out]), want)
    predictor = tk.load_predictor(path)
    torch.testing.assert_close(predictor(batch), want)
