"""The before/after table and the technique registry (no compression library needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import torchkiln as tk
from torchkiln.compress import compare as cmp
from torchkiln.compress import registry


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))


def test_report_counts_params_flops_size_and_agreement(tmp_path):
    before, after = _mlp(64), _mlp(64)
    with torch.no_grad():
        for p in after.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    x = torch.randn(8, 16)
    saved = tmp_path / "after.bin"
    saved.write_bytes(b"x" * 1234)
    report = cmp.compare_models(
        before, after, x, artifacts={"after": saved}, max_time_s=0.2, min_rounds=3, name="mlp"
    )
    assert report.before["params"] == report.after["params"] == 16 * 64 + 64 + 64 * 4 + 4
    assert report.before["flops"] == 2 * 8 * (16 * 64 + 64 * 4)
    assert report.after["artifact_bytes"] == 1234
    assert report.before["artifact_bytes"] > 4 * report.before["params"]  # fp32 weights + pickle framing
    assert report.agreement["cosine"] > 0.999 and report.agreement["sqnr_db"] > 30
    assert report.speedup is not None and report.speedup > 0
    text = report.render()
    for label in ("parameters", "artifact size", "FLOPs / call", "latency p50", "output agreement"):
        assert label in text
    d = report.to_dict()
    assert d["size_ratio"] == pytest.approx(1234 / report.before["artifact_bytes"])


def test_accuracy_drop_uses_the_evaluator_on_both_models():
    before, after = _mlp(32), _mlp(8)
    x = torch.randn(4, 16)
    seen = []

    def evaluate(fn):
        seen.append(fn)
        return 0.9 if len(seen) == 1 else 0.85

    report = cmp.compare_models(before, after, x, eval_fn=evaluate, max_time_s=0.1, min_rounds=2)
    assert len(seen) == 2
    assert report.accuracy_drop_pt == pytest.approx(5.0)
    assert "accuracy" in report.render()


def test_dict_inputs_and_mismatched_outputs():
    class Keyed(nn.Module):
        def __init__(self, out: int) -> None:
            super().__init__()
            self.lin = nn.Linear(6, out)

        def forward(self, *, features):
            return {"logits": self.lin(features)}

    report = cmp.compare_models(
        Keyed(3), Keyed(3), {"features": torch.randn(2, 6)}, max_time_s=0.1, min_rounds=2, flops=False
    )
    assert report.batch_size == 2 and report.before["flops"] is None
    with pytest.raises(cmp.CompareError, match="differ in shape"):
        cmp.compare_models(Keyed(3), Keyed(5), {"features": torch.randn(2, 6)}, max_time_s=0.1, min_rounds=2)


def test_mode_is_validated():
    with pytest.raises(cmp.CompareError, match="mode must be"):
        cmp.compare_models(_mlp(4), _mlp(4), torch.randn(1, 16), mode="jit")  # type: ignore[arg-type]


def test_models_keep_their_training_mode():
    before, after = _mlp(8), _mlp(8)
    before.train()
    after.eval()
    cmp.compare_models(before, after, torch.randn(2, 16), max_time_s=0.05, min_rounds=2)
    assert before.training and not after.training


def test_registry_rejects_bad_registrations_and_names_close_matches():
    @dataclass
    class Mutable:
        x: int = 1

    with pytest.raises(registry.TechniqueError, match="frozen dataclass"):
        registry.register_technique("quantize/mutable", Mutable)
    with pytest.raises(registry.TechniqueError, match="family/name"):
        registry.register_technique("noslash", Mutable)

    @dataclass(frozen=True)
    class NeedsGpu:
        pass

    with pytest.raises(registry.TechniqueError, match="unknown requirement"):
        registry.register_technique("quantize/gpu", NeedsGpu, needs=("tpu",))

    registry.register_technique("quantize/gpu-only", NeedsGpu, needs=("cuda",))(lambda m, c: m)
    try:
        with pytest.raises(registry.TechniqueError, match="did you mean 'quantize/gpu-only'"):
            registry.get_technique("quantize/gpu-onl")
        if not torch.cuda.is_available():
            assert registry.check_technique(NeedsGpu()) and "CUDA" in registry.check_technique(NeedsGpu())[0]
            with pytest.raises(registry.TechniqueUnavailableError, match="needs a CUDA GPU"):
                tk.quantize(nn.Linear(2, 2), NeedsGpu())
        with pytest.raises(registry.TechniqueError, match="is a 'quantize' technique"):
            tk.prune(nn.Linear(2, 2), NeedsGpu())
    finally:
        registry._unregister("quantize/gpu-only")
    with pytest.raises(registry.TechniqueError, match="not a registered technique config"):
        tk.quantize(nn.Linear(2, 2), NeedsGpu())


def test_every_registered_technique_is_described():
    for info in registry.describe_techniques():
        assert info["name"].count("/") == 1 and info["summary"], info
        assert isinstance(info["missing"], list)


def test_packed_int8_weights_count_as_parameters():
    pytest.importorskip("torchao")
    model = tk.create_model("mlp", hidden=(32, 32))
    quantized = tk.quantize(model, tk.Int8Dynamic(backend="eager", keep_first_last=False))
    packed_only = sum(p.numel() for p in quantized.parameters())
    assert packed_only < cmp.parameter_count(quantized) == cmp.parameter_count(model)
