"""Dynamic and weight-only int8, QAT, layer selection, outliers, sensitivity, saving: numerics in eager mode
(the compiled paths are covered by the benchmarks and one slow test)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import torchkiln as tk
from torchkiln.compress.compare import output_agreement
from torchkiln.compress.outliers import activation_outlier_ratio, inject_activation_outliers
from torchkiln.compress.quantize import (
    Int8Dynamic,
    Int8QAT,
    Int8WeightOnly,
    QuantizeError,
    convert_qat,
    int8_weight_fraction,
    load_quantized,
    prepare_qat,
    quant_info,
    save_quantized,
    select_layers,
)
from torchkiln.compress.registry import TechniqueUnavailableError
from torchkiln.compress.sensitivity import keep_sensitive_in_float, sensitivity

pytest.importorskip("torchao")

SQNR_MIN_DB = 20.0  # torchao's int8 tests bound SQNR at ~20-30 dB; random small models sit at 35-45


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def _zoo(name: str):
    torch.manual_seed(0)
    kw = {
        "mlp": {"hidden": (64, 64)},
        "gpt-tiny": {"n_layer": 2, "n_embd": 64, "seq_len": 32, "vocab_size": 128},
        "resnet-tiny": {"widths": (16, 32), "blocks_per_stage": (1, 1)},
    }[name]
    model = tk.create_model(name, **kw).eval()
    return model, model.example_inputs(4)


def _bert(layers: int = 2, hidden: int = 64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        vocab_size=500,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    return model, {"input_ids": torch.randint(0, 500, (4, 32))}


@pytest.mark.parametrize("backend", ["torchao", "eager"])
@pytest.mark.parametrize("name", ["mlp", "gpt-tiny"])
def test_dynamic_int8_agrees_with_float(name, backend):
    model, x = _zoo(name)
    q = tk.quantize(model, Int8Dynamic(backend=backend))
    with torch.no_grad():
        agreement = output_agreement(_call(model, x), _call(q, x))
    assert agreement["sqnr_db"] > SQNR_MIN_DB
    assert quant_info(q)["backend"] == backend
    assert int8_weight_fraction(q) > 0.5
    assert int8_weight_fraction(model) == 0.0  # the float model was not touched


@pytest.mark.parametrize("backend", ["torchao", "eager"])
def test_dynamic_int8_hf_bert(backend):
    model, x = _bert()
    q = tk.quantize(model, Int8Dynamic(backend=backend))
    with torch.no_grad():
        agreement = output_agreement(model(**x), q(**x))
    assert agreement["sqnr_db"] > SQNR_MIN_DB
    assert agreement["cosine"] > 0.999


def test_torchao_weights_are_int8_tensors():
    from torchao.quantization import Int8Tensor

    model, _ = _zoo("gpt-tiny")
    q = tk.quantize(model, Int8Dynamic())
    quantized = {n for n, m in q.named_modules() if isinstance(getattr(m, "weight", None), Int8Tensor)}
    assert quantized == set(quant_info(q)["layers"])
    w = q.blocks[0].mlp.fc.weight
    assert w.qdata.dtype == torch.int8 and w.qdata.shape == (256, 64)
    # the LM head (tied to the embedding) stays float by convention
    assert "lm_head" not in quantized and q.lm_head.weight.dtype == torch.float32


def test_eager_backend_quantizes_lstm():
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(16, 32, batch_first=True)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model = Tagger().eval()
    x = torch.randn(2, 7, 16)
    q = tk.quantize(model, Int8Dynamic(backend="eager"))
    assert type(q.lstm).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert isinstance(q.head, nn.Linear)  # last Linear kept float
    with torch.no_grad():
        assert output_agreement(model(x), q(x))["sqnr_db"] > SQNR_MIN_DB


def test_layer_selection_include_exclude_filter_and_first_last():
    model, _ = _zoo("gpt-tiny")
    everything = select_layers(model, Int8Dynamic(keep_first_last=False))
    assert everything[-1] == "lm_head" and len(everything) == 2 * 4 + 1
    assert "lm_head" not in select_layers(model, Int8Dynamic())
    only_mlp = select_layers(model, Int8Dynamic(include=("blocks.*.mlp.*",)))
    assert only_mlp == ["blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj"]
    no_attn = select_layers(model, Int8Dynamic(exclude=("*.attn.*",)))
    assert not any(".attn." in n for n in no_attn)
    big = select_layers(model, Int8Dynamic(filter_fn=lambda m, fqn: m.out_features >= 192))
    assert set(big) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"}
    q = tk.quantize(model, Int8Dynamic(include=("blocks.1.*",)))
    assert isinstance(q.blocks[0].mlp.fc.weight, torch.nn.Parameter)
    assert type(q.blocks[0].mlp.fc.weight.data) is torch.Tensor
    assert type(q.blocks[1].mlp.fc.weight).__name__ == "Int8Tensor"


def test_layer_selection_errors_name_the_layers():
    model, _ = _zoo("mlp")
    with pytest.raises(QuantizeError, match=r"matches no quantizable layer.*body\.0\.0"):
        tk.quantize(model, Int8Dynamic(include=("encoder.*",)))
    with pytest.raises(QuantizeError, match="no layer selected"):
        tk.quantize(model, Int8Dynamic(exclude=("body.*",)))
    with pytest.raises(QuantizeError, match="accepted: 'torchao', 'eager', 'onnxruntime'"):
        Int8Dynamic(backend="tensorrt")
    with pytest.raises(QuantizeError, match="tuple of fnmatch patterns"):
        Int8Dynamic(include="blocks.*")


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    from torchkiln.compress import registry

    monkeypatch.setitem(
        registry.REQUIREMENTS, "onnxruntime", lambda: "the Python package 'onnxruntime' (test)"
    )
    model, x = _zoo("mlp")
    with pytest.raises(TechniqueUnavailableError, match="onnxruntime.*needs.*'onnxruntime' \\(test\\)"):
        tk.quantize(model, Int8Dynamic(backend="onnxruntime"), example_inputs=x)
    monkeypatch.setitem(registry.REQUIREMENTS, "torchao", lambda: "the Python package 'torchao' (test)")
    with pytest.raises(TechniqueUnavailableError, match="quantize/int8-dynamic.*torchao"):
        tk.quantize(model, Int8Dynamic())


def test_eager_backend_missing_from_torch_is_a_clear_error(monkeypatch):
    import torch.ao.quantization as legacy

    monkeypatch.delattr(legacy, "quantize_dynamic")
    model, _ = _zoo("mlp")
    with pytest.raises(TechniqueUnavailableError, match="no longer ships"):
        tk.quantize(model, Int8Dynamic(backend="eager"))


@pytest.mark.parametrize("kind", ["gpt-tiny", "bert"])
def test_outliers_per_token_survives_where_per_tensor_degrades(kind):
    model, x = _bert() if kind == "bert" else _zoo("gpt-tiny")
    info = inject_activation_outliers(model)
    ratios = activation_outlier_ratio(model, x, info["ffn_out_layers"])
    assert min(ratios.values()) > 100  # like trained transformers' FFN output projection inputs
    with torch.no_grad():
        ref = _call(model, x)
        results = {}
        for granularity in ("per_token", "per_tensor"):
            q = tk.quantize(model, Int8Dynamic(granularity=granularity))
            results[granularity] = (
                output_agreement(ref, _call(q, x)),
                _task_agreement(ref, _call(q, x), kind),
            )
    tok, tensor = results["per_token"], results["per_tensor"]
    assert tok[0]["cosine"] > 0.999 and tok[0]["sqnr_db"] > 30
    assert tok[1] == 1.0  # task level: every top-1 / nearest neighbour agrees
    # per-tensor scales lose far more signal on the same model (>= 10 dB worse)
    assert tensor[0]["sqnr_db"] < tok[0]["sqnr_db"] - 10
    assert tensor[0]["cosine"] < tok[0]["cosine"]


def _task_agreement(ref, out, kind) -> float:
    if kind == "bert":  # nearest-neighbour agreement of mean-pooled sentence embeddings
        a = torch.nn.functional.normalize(ref.last_hidden_state.mean(1), dim=-1)
        b = torch.nn.functional.normalize(out.last_hidden_state.mean(1), dim=-1)
        sa, sb = a @ a.T, b @ b.T
        sa.fill_diagonal_(-2)
        sb.fill_diagonal_(-2)
        return float((sa.argmax(1) == sb.argmax(1)).float().mean())
    return float((ref.argmax(-1) == out.argmax(-1)).float().mean())


def _poisoned_mlp():
    """An MLP whose second Linear has a column of huge weights reading an input that is always 0: the float
    function is unchanged, but per-channel int8 scales of that layer are ruined."""
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(64, 64, 64)).eval()
    with torch.no_grad():
        ln = model.body[0][1]
        ln.weight[3] = 0.0
        ln.bias[3] = -1.0  # -> ReLU -> exactly 0 for every input
        w = model.body[1][0].weight
        w[:, 3] = 1000.0 * w.abs().max()
    return model


def test_sensitivity_ranks_the_injected_bad_layer_first():
    model = _poisoned_mlp()
    data = [(torch.rand(32, 64),) for _ in range(2)]
    report = sensitivity(model, Int8Dynamic(backend="eager"), data)
    assert report.ranking()[0] == "body.1.0"
    assert report.layers[0].sqnr_db < 10 < report.layers[1].sqnr_db
    assert report.all_quantized is not None
    assert "body.1.0" in report.table().columns[0]._cells


def test_keep_sensitive_in_float_meets_the_budget():
    model = _poisoned_mlp()
    data = [(torch.rand(64, 64),) for _ in range(2)]
    x = torch.rand(256, 64)
    labels = model(x).argmax(-1)

    def accuracy(m):
        with torch.no_grad():
            return float((m(x).argmax(-1) == labels).float().mean())

    config, q, steps = keep_sensitive_in_float(
        model, Int8Dynamic(backend="eager"), data, accuracy, budget_pt=2.0
    )
    assert "body[.]1[.]0" in config.exclude or "body.1.0" in config.exclude
    assert steps[0]["accuracy_drop_pt"] > 2.0 and steps[-1]["accuracy_drop_pt"] <= 2.0
    assert "body.1.0" not in quant_info(q)["layers"]


def test_weight_only_int8():
    from torchao.quantization import Int8Tensor

    model, x = _zoo("gpt-tiny")
    q = tk.quantize(model, Int8WeightOnly())
    assert isinstance(q.blocks[0].attn.qkv.weight, Int8Tensor)
    assert q.blocks[0].attn.qkv.weight.act_quant_kwargs is None  # activations stay float
    with torch.no_grad():
        assert output_agreement(model(*x), q(*x))["sqnr_db"] > 30


def test_qat_prepare_fit_convert():
    from torchao.quantization import Int8Tensor
    from torchao.quantization.qat import FakeQuantizedLinear

    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(64, 64))
    prepared = tk.quantize(model, Int8QAT(step="prepare"))
    assert isinstance(prepared.body[0][0], FakeQuantizedLinear) and isinstance(prepared.head, nn.Linear)
    train, val = tk.create_dataset("digits", "train"), tk.create_dataset("digits", "val")
    result = tk.fit(prepared, train, val, epochs=1, max_steps=15, lr=3e-3, progress="off", flops=False)
    assert result.steps == 15 and all(math.isfinite(v) for v in result.losses)
    fake_out = prepared.eval()(val[:16][0])
    converted = tk.quantize(prepared, Int8QAT(step="convert"))
    assert isinstance(converted.body[0][0].weight, Int8Tensor)
    assert converted.body[0][0].weight.qdata.dtype == torch.int8
    with torch.no_grad():
        # the converted int8 model computes what training simulated
        assert output_agreement(fake_out, converted(val[:16][0]))["sqnr_db"] > 25
    with pytest.raises(QuantizeError, match="no fake-quantized layers"):
        tk.quantize(model, Int8QAT(step="convert"))


def test_prepare_convert_functions_in_place():
    from torchao.quantization import Int8Tensor

    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(32,))
    assert prepare_qat(model) is model
    assert isinstance(convert_qat(model).body[0][0].weight, Int8Tensor)


@pytest.mark.parametrize("backend", ["torchao", "eager"])
def test_save_is_smaller_and_loads_again(tmp_path, backend):
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(256, 256)).eval()
    x = model.example_inputs(8)
    config = Int8Dynamic(backend=backend, keep_first_last=False)
    q = tk.quantize(model, config)
    fp32 = tmp_path / "fp32.pt"
    torch.save(model.state_dict(), fp32)
    path = save_quantized(q, tmp_path / "int8.pt")
    ratio = os.path.getsize(path) / os.path.getsize(fp32)
    assert ratio < 0.35  # int8 weights: ~4x smaller (scales, biases and LayerNorms stay float)
    again = load_quantized(path, model=model, config=config)
    with torch.no_grad():
        assert torch.equal(q(*x), again(*x))
    with pytest.raises(QuantizeError, match="pass model="):
        load_quantized(path)


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(QuantizeError, match="not made by tk.quantize"):
        save_quantized(nn.Linear(2, 2), tmp_path / "x.pt")


def test_techniques_are_registered():
    names = tk.list_techniques("quantize/*")
    for name in (
        "quantize/int8-dynamic",
        "quantize/int8-static",
        "quantize/int8-weight-only",
        "quantize/int8-qat",
    ):
        assert name in names
    assert tk.Int8Dynamic is Int8Dynamic


@pytest.mark.slow
def test_torchao_dynamic_compiled_matches_eager():
    from torchkiln.compress.quantize import run_like

    model, x = _zoo("gpt-tiny")
    q = tk.quantize(model, Int8Dynamic())
    run_float, run_q = run_like(q, model)
    with torch.no_grad():
        ref = model(*x)
        assert output_agreement(ref, run_q(*x))["sqnr_db"] > SQNR_MIN_DB
        assert output_agreement(ref, run_float(*x))["sqnr_db"] > 60


def test_int4_weight_only_packs_and_agrees(tmp_path):
    from torchkiln.compress.quantize import Int4Linear, Int4WeightOnly

    model, x = _zoo("gpt-tiny")
    config = Int4WeightOnly(group_size=32)
    q = tk.quantize(model, config)
    fc = q.blocks[0].mlp.fc
    assert isinstance(fc, Int4Linear) and fc.packed.dtype == torch.uint8
    assert fc.packed.numel() == 256 * 64 // 2  # two 4-bit weights per byte
    with torch.no_grad():
        agreement = output_agreement(model(*x), q(*x))
    assert agreement["sqnr_db"] > 12 and agreement["cosine"] > 0.97  # 4 bits: coarser than int8
    path = save_quantized(q, tmp_path / "int4.pt")
    again = load_quantized(path, model=model, config=config)
    with torch.no_grad():
        assert torch.equal(q(*x), again(*x))
    with pytest.raises(QuantizeError, match="accepted: 32, 64, 128, 256"):
        Int4WeightOnly(group_size=48)
