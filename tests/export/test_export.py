"""Every format matches eager on CNN, transformer and MLP at several batch sizes, and loads back as a
Predictor with the same outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torchkiln as tk
from torchkiln.export import SUFFIXES, ExportError, PredictorInputError, load_predictor, read_sidecar
from torchkiln.export.verify import tolerance

from .conftest import small_model

FORMATS = ["torchscript", "export", "onnx"]
MODELS = ["mlp", "resnet-tiny", "gpt-tiny"]


def _close(fmt: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = tolerance(fmt, expected.dtype)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_export_verifies_at_several_batch_sizes(exported, name: str, fmt: str) -> None:
    model, result = exported(name, fmt)
    assert result.ok and result.format == fmt
    assert result.path.is_file() and result.sidecar.is_file()
    assert result.path.suffix == SUFFIXES[fmt]
    assert sorted({c.batch_size for c in result.checks}) == [1, 2, 5]
    assert all(c.max_abs <= c.atol + c.rtol * 100 for c in result.checks)
    assert result.size_bytes == sum(f.stat().st_size for f in result.files)
    if name == "resnet-tiny":
        assert len(result.fused) == 6  # stem + 2 per block + the strided block's shortcut
    else:
        assert result.fused == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_load_predictor_round_trip(exported, name: str, fmt: str) -> None:
    model, result = exported(name, fmt)
    predictor = load_predictor(result.path)
    assert predictor.format == fmt
    assert predictor.input_names == [s.name for s in result.input_specs]
    assert predictor.input_specs[0].shape[0] is None  # dynamic batch
    assert predictor.output_names == result.output_names == ["output"]
    for bs in (3, 7):
        inputs = model.example_inputs(bs)
        with torch.no_grad():
            expected = model(*inputs)
        got = predictor(*inputs)
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape
        _close(fmt, got, expected)
    predictor.warmup([1, 4])


def test_sidecar_describes_the_artifact(exported) -> None:
    model, result = exported("gpt-tiny", "onnx")
    meta = read_sidecar(result.path)
    assert meta == json.loads(result.sidecar.read_text())
    assert meta["format"] == "onnx" and meta["artifact"] == result.path.name
    assert meta["inputs"] == [{"name": "idx", "dtype": "int64", "shape": [None, 16]}]
    assert meta["outputs"] == [{"name": "output", "dtype": "float32", "shape": [None, 16, 64]}]
    assert meta["torch"] == torch.__version__ and "onnxruntime" in meta
    assert meta["verification"]["ok"] is True
    assert meta["verification"]["max_abs_error"] == result.max_abs_error
    assert len(meta["verification"]["checks"]) == 3


def test_predictor_takes_numpy_and_checks_inputs(exported) -> None:
    model, result = exported("mlp", "onnx")
    predictor = load_predictor(result.path, threads=1)
    x = np.random.rand(4, 64).astype(np.float32)
    out = predictor(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 10)
    _close("onnx", out, model(torch.from_numpy(x)).detach())
    with pytest.raises(PredictorInputError, match="dtype float64, expected float32"):
        predictor(np.random.rand(4, 64))
    with pytest.raises(PredictorInputError, match=r"shape \[4, 63\], expected \['\*', 64\]"):
        predictor(torch.rand(4, 63))
    with pytest.raises(PredictorInputError, match="takes 1 input"):
        predictor(torch.rand(4, 64), torch.rand(4, 64))
    predictor.threads = 2
    assert predictor.threads == 2
    _close("onnx", predictor(torch.from_numpy(x)), out)


def test_batch_one_example_still_gives_a_dynamic_batch(tmp_path) -> None:
    model = small_model("mlp")
    result = tk.export(model, model.example_inputs(1), tmp_path / "m.pt2", format="export", verbose=False)
    assert sorted({c.batch_size for c in result.checks}) == [1, 4]
    predictor = load_predictor(result.path)
    x = torch.rand(6, 64)
    _close("export", predictor(x), model(x).detach())


def test_static_batch(tmp_path) -> None:
    model = small_model("mlp")
    result = tk.export(
        model, model.example_inputs(3), tmp_path / "m.onnx", format="onnx", dynamic_batch=False, verbose=False
    )
    predictor = load_predictor(result.path)
    assert predictor.input_specs[0].shape == (3, 64)
    with pytest.raises(PredictorInputError):
        predictor(torch.rand(2, 64))


def test_directory_path_and_model_mode_restored(tmp_path) -> None:
    model = small_model("resnet-tiny").train()
    result = tk.export(model, model.example_inputs(2), tmp_path, format="torchscript", verbose=False)
    assert result.path == tmp_path / "model.pt"
    assert model.training  # the caller's model is left as it was
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # fused a copy
    assert load_predictor(tmp_path).format == "torchscript"  # a directory with one artifact


def test_unknown_format_and_bad_inputs(tmp_path) -> None:
    model = small_model("mlp")
    with pytest.raises(ExportError, match="unknown export format 'tflite'; accepted: torchscript"):
        tk.export(model, model.example_inputs(2), tmp_path / "m", format="tflite")
    with pytest.raises(ExportError, match="keyword"):
        tk.export(model, {"x": torch.rand(2, 64)}, tmp_path / "m")
    with pytest.raises(ExportError, match="first dimensions differ"):
        tk.export(torch.nn.Bilinear(3, 4, 5), (torch.rand(2, 3), torch.rand(3, 4)), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


class TwoOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 4)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.a(x) * scale, "aux": self.b(x).relu()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_dict_outputs_and_two_inputs(tmp_path, fmt: str) -> None:
    torch.manual_seed(0)
    model = TwoOutputs().eval()
    example = (torch.rand(2, 8), torch.rand(2, 1))
    result = tk.export(model, example, tmp_path / "two", format=fmt, verbose=False)
    assert result.output_names == ["logits", "aux"]
    predictor = load_predictor(result.path)
    assert predictor.input_names == ["x", "scale"]
    x, s = torch.rand(5, 8), torch.rand(5, 1)
    logits, aux = predictor(x, s)
    expected = model(x, s)
    _close(fmt, logits, expected["logits"].detach())
    _close(fmt, aux, expected["aux"].detach())


def test_hf_bert_onnx_and_export(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # one padded row: the mask matters
    for fmt in ("onnx", "export"):
        result = tk.export(model, (ids, mask), tmp_path / f"bert-{fmt}", format=fmt, verbose=False)
        assert result.ok
        assert result.output_names == ["last_hidden_state", "pooler_output"]
        predictor = load_predictor(result.path)
        assert predictor.input_names == ["input_ids", "attention_mask"]
        ids3 = torch.randint(0, 100, (3, 12))
        mask3 = torch.ones(3, 12, dtype=torch.long)
        mask3[2, 5:] = 0
        hidden, pooled = predictor(ids3, mask3)
        expected = model(ids3, mask3)
        _close(fmt, hidden, expected.last_hidden_state.detach())
        _close(fmt, pooled, expected.pooler_output.detach())


def test_load_predictor_errors(tmp_path) -> None:
    with pytest.raises(ExportError, match="no artifact at"):
        load_predictor(tmp_path / "missing.onnx")
    weights = tmp_path / "w.pt"
    torch.save(small_model("mlp").state_dict(), weights)
    with pytest.raises(ExportError, match="plain weights file: pass model="):
        load_predictor(weights)
