"""Structured pruning: physical removal through the dependency graph, heads, protection, BN, save/load."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchkiln as tk
from torchkiln.compress.prune import (
    ChannelPrune,
    PruneError,
    attention_heads,
    channel_prune,
    find_output_layers,
    load_pruned,
    recalibrate_batchnorm,
    save_pruned,
)

pytest.importorskip("torch_pruning")

ZOO = {
    "mlp": {"hidden": (64, 48)},
    "resnet-tiny": {"widths": (16, 32, 64), "blocks_per_stage": (1, 2, 1)},
    "gpt-tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "seq_len": 16, "vocab_size": 64},
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels)
    return out


def _quiet_prune(model: nn.Module, config: ChannelPrune, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tk.prune(model, config, **kw)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_pruned_physically_runs_and_reloads(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = tk.create_model(name, **ZOO[name]).eval()
    x = model.example_inputs(3)
    before_widths, before_params = _widths(model), _params(model)
    out_layer = find_output_layers(model, x)
    with torch.no_grad():
        ref_shape = model(*x).shape

    pruned = _quiet_prune(model, ChannelPrune(ratio=0.5), example_inputs=x)
    after = _widths(pruned)
    assert _params(pruned) < 0.7 * before_params
    with torch.no_grad():
        y = pruned(*x)
    assert y.shape == ref_shape
    # every width that changed is a multiple of round_to; the output layer keeps its outputs
    for layer, (i, o) in after.items():
        bi, bo = before_widths[layer]
        if i != bi:
            assert i % 8 == 0, (layer, i)
        if o != bo:
            assert o % 8 == 0, (layer, o)
    for layer in out_layer:
        assert after[layer][1] == before_widths[layer][1]
    assert not any(n.endswith("_mask") or n.endswith("_orig") for n, _ in pruned.named_parameters())

    path = save_pruned(pruned, tmp_path / f"{name}.pt", model_ref=name, model_args=ZOO[name])
    reloaded = load_pruned(path)
    assert _widths(reloaded) == after
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*x), y, rtol=0, atol=0)


def test_resnet_residual_shapes_stay_consistent() -> None:
    torch.manual_seed(0)
    model = tk.create_model("resnet-tiny", widths=(16, 32, 64), blocks_per_stage=(2, 2, 1))
    x = model.example_inputs(2)
    _quiet_prune(model, ChannelPrune(ratio=0.5), example_inputs=x)
    channels = model.stem[0].out_channels
    for block in model.blocks:
        assert block.conv1.in_channels == channels
        assert block.bn1.num_features == block.conv1.out_channels == block.conv2.in_channels
        if isinstance(block.shortcut, nn.Identity):
            assert block.conv2.out_channels == channels  # the add needs equal widths
        else:
            assert (
                block.shortcut[0].out_channels == block.conv2.out_channels == block.shortcut[1].num_features
            )
        channels = block.conv2.out_channels
        assert block.bn2.num_features == channels
    assert model.head.in_features == channels and model.head.out_features == 10


def test_gpt_heads_removed_and_attributes_updated() -> None:
    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", **ZOO["gpt-tiny"]).eval()
    x = model.example_inputs(2)
    _quiet_prune(model, ChannelPrune(ratio=0.5), example_inputs=x)
    for block in model.blocks:
        att = block.attn
        assert att.n_head == 2 and att.head_dim == 16
        assert att.qkv.out_features == 3 * att.n_head * att.head_dim == 96
        assert att.proj.in_features == 32 and att.proj.out_features == 64  # residual width kept
        assert block.mlp.fc.out_features == 128 and block.mlp.proj.in_features == 128
    assert model.tok_emb.weight.shape == (64, 64)
    assert model.lm_head.weight is model.tok_emb.weight  # the tied LM head is untouched


def test_removing_zeroed_heads_and_neurons_keeps_outputs_exactly() -> None:
    """Heads and neurons whose weights are all zero are the least important; removing them changes nothing."""
    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", **ZOO["gpt-tiny"]).eval()
    hd, width = 16, 64
    with torch.no_grad():
        for block in model.blocks:
            for h in (1, 3):
                for offset in (0, width, 2 * width):
                    block.attn.qkv.weight[offset + h * hd : offset + (h + 1) * hd] = 0
                    block.attn.qkv.bias[offset + h * hd : offset + (h + 1) * hd] = 0
                block.attn.proj.weight[:, h * hd : (h + 1) * hd] = 0
            block.mlp.fc.weight[::2] = 0
            block.mlp.fc.bias[::2] = 0
            block.mlp.proj.weight[:, ::2] = 0
    x = model.example_inputs(2)
    with torch.no_grad():
        expected = model(*x)
    _quiet_prune(model, ChannelPrune(ratio=0.5), example_inputs=x)
    assert [b.attn.n_head for b in model.blocks] == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(*x), expected, rtol=1e-5, atol=1e-5)


class ConcatGroupedNet(nn.Module):
    """Two branches concatenated, a depthwise conv and a grouped conv on the concatenation, BN, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(3, 32, 1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.bn_dw = nn.BatchNorm2d(64)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.b(x))], dim=1)
        y = torch.relu(self.bn_dw(self.dw(y)))
        y = torch.relu(self.grouped(y))
        return self.head(y.mean((2, 3)))


def test_concatenation_depthwise_and_grouped_convs() -> None:
    torch.manual_seed(0)
    model = ConcatGroupedNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = _params(model)
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    channel_prune(model, ChannelPrune(ratio=0.5), example_inputs=(x,), calibration=calib)
    assert _params(model) < before
    assert model.a.out_channels + model.b.out_channels == model.dw.in_channels == model.dw.out_channels
    assert model.dw.groups == model.dw.in_channels  # still depthwise
    assert model.grouped.in_channels % model.grouped.groups == 0
    assert model.bn_dw.num_features == model.dw.out_channels
    assert model.head.out_features == 5
    assert model(x).shape == (2, 5)


def test_ignored_patterns_and_output_detection() -> None:
    torch.manual_seed(0)
    model = tk.create_model("resnet-tiny", widths=(16, 32, 64))
    x = model.example_inputs(2)
    assert find_output_layers(model, x) == ["head"]
    _quiet_prune(model, ChannelPrune(ratio=0.5, ignored=("blocks.0.conv1",)), example_inputs=x)
    assert model.blocks[0].conv1.out_channels == 16  # its own group was left whole
    assert model.blocks[1].conv1.out_channels == 16  # others were pruned


def test_batchnorm_statistics_reestimated_on_calibration_data() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    batch = torch.randn(16, 1, 6, 6)
    assert recalibrate_batchnorm(model, [(batch, torch.zeros(16))], batches=4) == 1
    with torch.no_grad():
        act = model[0](batch)
    torch.testing.assert_close(model[1].running_mean, act.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, act.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert not model.training and model[1].momentum == 0.1


def test_taylor_importance_needs_calibration_and_uses_gradients() -> None:
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(32,))
    with pytest.raises(PruneError, match="calibration"):
        tk.prune(model, ChannelPrune(importance="taylor"), example_inputs=model.example_inputs(2))
    data = tk.create_dataset("synthetic", "train", task="classification", n=64, features=64, num_classes=10)
    tk.prune(
        model, ChannelPrune(importance="taylor"), example_inputs=model.example_inputs(2), calibration=data
    )
    assert model.body[0][0].out_features == 16
    assert all(p.grad is None for p in model.parameters())


def test_config_errors_name_what_is_accepted() -> None:
    with pytest.raises(PruneError, match=r"ratio must be in \[0, 1\)"):
        ChannelPrune(ratio=1.5)
    with pytest.raises(PruneError, match="accepted: l2, l1, taylor, random"):
        ChannelPrune(importance="magnitude")
    with pytest.raises(PruneError, match="round_to"):
        ChannelPrune(round_to=0)


def test_save_needs_a_model_reference_and_load_is_weights_only(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PruneError, match="model_ref"):
        save_pruned(model, tmp_path / "x.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(PruneError, match="not a torchkiln pruned model"):
        load_pruned(tmp_path / "plain.pt")
    torch.save({"format": "torchkiln-pruned", "obj": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(PruneError, match="cannot be read"):
        load_pruned(tmp_path / "pickled.pt")  # a pickled module is refused (weights_only=True)


def test_hugging_face_bert_heads_and_intermediate(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    known, _ = attention_heads(model)
    assert len(known) == 2
    before = _params(model)
    channel_prune(model, ChannelPrune(ratio=0.5), example_inputs=x)
    assert _params(model) < 0.7 * before
    for layer in model.bert.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2 and att.attention_head_size == 16 and att.all_head_size == 32
        assert att.query.out_features == att.key.out_features == att.value.out_features == 32
        assert layer.attention.output.dense.in_features == 32
        assert layer.intermediate.dense.out_features == 64
    assert model.classifier.out_features == 3
    with torch.no_grad():
        logits = model(**x).logits
    reloaded = load_pruned(save_pruned(model, tmp_path / "bert.pt"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).logits, logits, rtol=0, atol=0)
