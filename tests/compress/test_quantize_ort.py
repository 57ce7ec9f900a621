"""Dynamic int8 through ONNX Runtime: dynamo export, per-channel int8 weights, layer selection, artifact."""

from __future__ import annotations

import os

import pytest
import torch

import torchkiln as tk
from torchkiln.compress.compare import output_agreement
from torchkiln.compress.quantize import (
    Int8Dynamic,
    int8_weight_fraction,
    load_quantized,
    quant_info,
    save_quantized,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


def _op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", n_layer=2, n_embd=64, seq_len=32, vocab_size=128).eval()
    return model, model.example_inputs(4)


def test_ort_int8_agrees_and_holds_int8_weights(gpt, tmp_path):
    model, x = gpt
    q = tk.quantize(model, Int8Dynamic(backend="onnxruntime", threads=1), example_inputs=x, workdir=tmp_path)
    with torch.no_grad():
        agreement = output_agreement(model(*x), q(*x))
    assert agreement["sqnr_db"] > 20 and agreement["top1_agreement"] > 0.95
    info = quant_info(q)
    assert info["backend"] == "onnxruntime" and info["quantized_nodes"] == len(info["layers"]) == 8
    assert q.session.get_session_options().intra_op_num_threads == 1
    assert (
        _op_counts(q.path).get("MatMulInteger", 0) + _op_counts(q.path).get("DynamicQuantizeMatMul", 0) == 8
    )
    assert int8_weight_fraction(q) > 0.3  # the embedding / LM head stay float
    # dynamic batch: another batch size runs through the same session
    with torch.no_grad():
        y = model.example_inputs(1)
        assert output_agreement(model(*y), q(*y))["sqnr_db"] > 20


def test_ort_layer_selection(gpt, tmp_path):
    model, x = gpt
    q = tk.quantize(
        model, Int8Dynamic(backend="onnxruntime", include=("blocks.0.*",)), example_inputs=x, workdir=tmp_path
    )
    assert quant_info(q)["layers"] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
    ]
    assert quant_info(q)["quantized_nodes"] == 4
    assert _op_counts(q.path).get("MatMulInteger", 0) == 4


def test_ort_mlp_gemm_rewritten_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(256, 256)).eval()
    x = model.example_inputs(8)
    q = tk.quantize(
        model, Int8Dynamic(backend="onnxruntime", keep_first_last=False), example_inputs=x, workdir=tmp_path
    )
    assert quant_info(q)["quantized_nodes"] == 3  # 2D linears export as Gemm; rewritten as MatMul to quantize
    path = save_quantized(q, tmp_path / "out" / "model.onnx")
    fp32 = quant_info(q)["fp32_onnx"]
    assert os.path.getsize(path) < 0.35 * os.path.getsize(fp32)
    again = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(q(*x), again(*x))
        assert output_agreement(model(*x), again(*x))["sqnr_db"] > 20


def test_ort_wrapper_input_errors(gpt, tmp_path):
    model, x = gpt
    q = tk.quantize(model, Int8Dynamic(backend="onnxruntime"), example_inputs=x, workdir=tmp_path)
    with pytest.raises(TypeError, match="missing input"):
        q()
    with pytest.raises(TypeError, match="unexpected input"):
        q(x[0], x[0])


def test_ort_needs_example_inputs():
    from torch import nn

    from torchkiln.compress.quantize import QuantizeError

    with pytest.raises(QuantizeError, match="needs example_inputs"):
        tk.quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), Int8Dynamic(backend="onnxruntime"))


def test_ort_hf_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=500
    )
    model = transformers.BertModel(config).eval()
    x = {"input_ids": torch.randint(0, 500, (2, 32))}
    q = tk.quantize(model, Int8Dynamic(backend="onnxruntime"), example_inputs=x, workdir=tmp_path)
    with torch.no_grad():
        agreement = output_agreement(model(**x), q(**x))
    assert agreement["cosine"] > 0.999
