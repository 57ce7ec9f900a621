"""A mismatch raises ExportVerificationError naming format, output, errors and tolerance; a failed export
leaves nothing behind (and an earlier artifact untouched)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

import torchkiln as tk
from torchkiln.export import (
    ExportError,
    ExportVerificationError,
    aoti_unavailable_reason,
    load_predictor,
    read_sidecar,
)
from torchkiln.export import core as export_core
from torchkiln.export.fusion import fuse_with_report

from .conftest import small_model


def test_zero_tolerance_raises_and_writes_nothing(tmp_path) -> None:
    model = small_model("resnet-tiny")
    with pytest.raises(ExportVerificationError) as info:
        tk.export(model, model.example_inputs(2), tmp_path / "r.onnx", format="onnx", atol=0.0, rtol=0.0)
    message = str(info.value)
    assert "onnx export does not match eager PyTorch" in message
    assert "nothing was written" in message
    assert "output: max abs" in message and "(atol 0, rtol 0) MISMATCH" in message
    assert info.value.checks and not all(c.ok for c in info.value.checks)
    assert isinstance(info.value, tk.KilnError)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_weight_is_caught(tmp_path, monkeypatch) -> None:
    def corrupting_fuse(model, example):
        report = fuse_with_report(model, example)
        with torch.no_grad():
            report.model.get_submodule("blocks.1.conv2").weight[0].mul_(1.5)
        return report

    monkeypatch.setattr(export_core, "fuse_with_report", corrupting_fuse)
    model = small_model("resnet-tiny")
    with pytest.raises(ExportVerificationError, match=r"export export does not match .* batch 2 output"):
        tk.export(model, model.example_inputs(2), tmp_path / "r.pt2", format="export", verbose=False)
    assert list(tmp_path.iterdir()) == []


class Branchy(torch.nn.Module):
    """Data-dependent control flow: tracing bakes in the branch the example took."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_trace_of_data_dependent_branch_fails_verification(tmp_path) -> None:
    model = Branchy().eval()
    example = (torch.rand(2, 4) + 0.1,)
    negative = (-torch.rand(3, 4) - 0.1,)
    with pytest.raises(ExportVerificationError, match="torchscript export does not match.*batch 3 output"):
        tk.export(model, example, tmp_path / "b.pt", format="torchscript", verify_inputs=[example, negative])
    assert list(tmp_path.iterdir()) == []


def test_verify_false_records_but_does_not_raise(tmp_path) -> None:
    model = small_model("mlp")
    result = tk.export(
        model,
        model.example_inputs(2),
        tmp_path / "m.onnx",
        format="onnx",
        atol=0,
        rtol=0,
        verify=False,
        verbose=False,
    )
    assert not result.ok
    meta = read_sidecar(result.path)
    assert meta["verification"] == {**meta["verification"], "ok": False, "enforced": False}


def test_failed_export_keeps_the_earlier_artifact(tmp_path, monkeypatch) -> None:
    model = small_model("mlp")
    first = tk.export(model, model.example_inputs(2), tmp_path / "m.pt2", format="export", verbose=False)
    before = first.path.read_bytes(), first.sidecar.read_text()

    def half_write_then_fail(fmt, model, wrapper, inputs, dest, **kwargs):
        dest.write_bytes(b"half an artifact")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_core, "_write", half_write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tk.export(model, model.example_inputs(2), tmp_path / "m.pt2", format="export", verbose=False)
    assert (first.path.read_bytes(), first.sidecar.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "m.pt2.kiln.json"]  # no temp left
    x = torch.rand(3, 64)
    torch.testing.assert_close(load_predictor(first.path)(x), model(x).detach())


def test_export_failure_names_the_cause(tmp_path) -> None:
    class NeedsBatch2(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, -1)  # specializes the batch dimension

    with pytest.raises(ExportError, match=r"eager model itself fails .* shape \[1, 3\].*dynamic_batch=False"):
        tk.export(NeedsBatch2(), (torch.rand(2, 3),), tmp_path / "n.pt2", format="export", verbose=False)
    result = tk.export(
        NeedsBatch2(),
        (torch.rand(2, 3),),
        tmp_path / "n.pt2",
        format="export",
        dynamic_batch=False,
        verbose=False,
    )
    assert result.ok and [c.batch_size for c in result.checks] == [2]


def test_aoti_without_compiler_says_why(monkeypatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    reason = aoti_unavailable_reason()
    assert reason and "no-such-compiler-xyz" in reason
    model = small_model("mlp")
    with pytest.raises(ExportError, match="format 'aoti' is not available: AOTInductor compiles C"):
        tk.export(model, model.example_inputs(2), "unused.pt2", format="aoti")


@pytest.mark.parametrize(
    "name",
    [
        "torchkiln.export",
        "torchkiln.export.core",
        "torchkiln.export.fusion",
        "torchkiln.export.predictor",
        "torchkiln.export.spec",
        "torchkiln.export.verify",
        "torchkiln.export.models",
    ],
)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
