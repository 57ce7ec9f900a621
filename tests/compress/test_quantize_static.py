"""Static int8 through PT2E (X86InductorQuantizer): calibration, conv-BN folding, oneDNN lowering, saving."""

from __future__ import annotations

import os

import pytest
import torch

import torchkiln as tk
from torchkiln.compress.compare import output_agreement
from torchkiln.compress.quantize import (
    Int8Static,
    QuantizeError,
    int8_weight_fraction,
    load_quantized,
    quant_info,
    save_quantized,
)

pytest.importorskip("torchao")
if not tk.describe_techniques("quantize/int8-static")[0]["missing"] == []:
    pytest.skip("static int8 needs an x86 CPU and a quantized engine", allow_module_level=True)


def _resnet():
    torch.manual_seed(0)
    model = tk.create_model("resnet-tiny", in_channels=3, widths=(16, 32), blocks_per_stage=(1, 1)).eval()
    # non-trivial BatchNorm statistics, so folding them matters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    calibration = [(torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)) for _ in range(6)]
    return model, calibration


def _ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.fixture(scope="module")
def static_resnet():
    model, calibration = _resnet()
    return model, calibration, tk.quantize(model, Int8Static(calibration=calibration, num_batches=4))


def test_static_int8_cnn_agrees_and_runs_onednn_int8(static_resnet):
    model, calibration, q = static_resnet
    x = calibration[5][0]
    with torch.no_grad():
        agreement = output_agreement(model(x), q(x))
    assert agreement["sqnr_db"] > 20
    ops = _ops(q)
    assert "onednn.qconv2d_pointwise.binary" in ops or "onednn.qconv_pointwise.default" in ops
    info = quant_info(q)
    assert info["calibration_batches"] == 4  # num_batches honoured (6 were given)
    assert info["layers"][0] != "stem.0" and "head" not in info["layers"]  # stem conv and classifier float


def test_conv_bn_folded_and_weights_int8(static_resnet):
    _, _, q = static_resnet
    converted = quant_info(q)["converted"]
    ops = _ops(converted)
    assert not any("batch_norm" in op for op in ops)
    int8 = [t for t in converted.state_dict().values() if t.dtype == torch.int8]
    assert len(int8) == len(quant_info(q)["layers"])
    assert int8_weight_fraction(converted) > 0.9


def test_dynamic_batch_after_calibration(static_resnet):
    model, _, q = static_resnet
    with torch.no_grad():
        for batch in (1, 32):
            x = torch.rand(batch, 3, 16, 16)
            assert output_agreement(model(x), q(x))["sqnr_db"] > 20


def test_static_mlp_linear_only():
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(64, 64)).eval()
    data = [(torch.rand(16, 64),) for _ in range(3)]
    q = tk.quantize(model, Int8Static(calibration=data, observer="minmax"))
    assert "onednn.qlinear_pointwise.default" in _ops(q)
    with torch.no_grad():
        assert output_agreement(model(*data[0]), q(*data[0]))["sqnr_db"] > 20


def test_selection_keep_first_last_and_exclude():
    model, calibration = _resnet()
    q = tk.quantize(model, Int8Static(calibration=calibration, keep_first_last=False, lower="reference"))
    assert quant_info(q)["layers"][0] == "stem.0" and quant_info(q)["layers"][-1] == "head"
    q2 = tk.quantize(model, Int8Static(calibration=calibration, exclude=("blocks.1.*",), lower="reference"))
    assert not any(n.startswith("blocks.1.") for n in quant_info(q2)["layers"])
    n_int8 = sum(t.dtype == torch.int8 for t in q2.state_dict().values())
    assert n_int8 == len(quant_info(q2)["layers"])


@pytest.mark.parametrize("observer", ["histogram", "minmax", "moving_average"])
def test_observers(observer):
    model, calibration = _resnet()
    q = tk.quantize(model, Int8Static(calibration=calibration, observer=observer, lower="reference"))
    with torch.no_grad():
        assert output_agreement(model(calibration[0][0]), q(calibration[0][0]))["sqnr_db"] > 15


def _weight_bytes(pt2) -> int:
    import zipfile

    with zipfile.ZipFile(pt2) as archive:
        return sum(
            i.file_size
            for i in archive.infolist()
            if ("/data/weights/" in i.filename or "/data/constants/" in i.filename)
            and not i.filename.endswith(".json")
        )


def test_save_pt2_smaller_and_loads(static_resnet, tmp_path):
    model, calibration, q = static_resnet
    path = save_quantized(q, tmp_path / "model.pt2")
    fp32 = tmp_path / "fp32.pt2"
    torch.export.save(torch.export.export(model, (calibration[0][0][:2],)), fp32)
    assert os.path.getsize(path) < os.path.getsize(fp32)
    # the weights in the archive are int8: ~4x smaller (the graph description is the same size in both)
    assert _weight_bytes(path) < 0.35 * _weight_bytes(fp32)
    again = load_quantized(path)
    x = calibration[1][0]
    with torch.no_grad():
        assert output_agreement(q(x), again(x))["sqnr_db"] > 60


def test_errors():
    model, _ = _resnet()
    with pytest.raises(QuantizeError, match="needs calibration data"):
        tk.quantize(model, Int8Static())
    with pytest.raises(QuantizeError, match="iterable of batches"):
        tk.quantize(model, Int8Static(calibration=3))
    with pytest.raises(QuantizeError, match="accepted: 'x86', 'inductor', 'reference'"):
        Int8Static(lower="tensorrt")


@pytest.mark.slow
def test_lowered_model_compiles_with_freezing():
    from torchkiln.compress.quantize import run_like

    (
        model,
        calibration,
    ) = _resnet()
    q = tk.quantize(model, Int8Static(calibration=calibration, lower="inductor"))
    run_float, run_q = run_like(q, model)
    x = calibration[0][0]
    with torch.no_grad():
        assert output_agreement(model(x), run_q(x))["sqnr_db"] > 20
