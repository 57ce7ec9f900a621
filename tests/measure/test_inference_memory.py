"""Inference memory: the allocator peak of one call (PyTorch runtimes) and the process growth of an ONNX
Runtime session, on an MLP, a CNN and a transformer."""

import pytest
import torch

import torchkiln as tk
from torchkiln.measure.memory import call_peak_bytes, onnx_process_peak_bytes


def _models():
    torch.manual_seed(0)
    yield "mlp", tk.create_model("mlp", hidden=(128,)).eval(), torch.randn(32, 64)
    yield "cnn", tk.create_model("resnet-tiny").eval(), torch.randn(32, 1, 8, 8)
    yield (
        "transformer",
        tk.create_model("gpt-tiny", vocab_size=64, seq_len=16, n_layer=1, n_embd=32).eval(),
        torch.randint(0, 64, (8, 16)),
    )


def test_call_peak_counts_what_one_call_holds_at_once():
    n = 1 << 20
    one = call_peak_bytes(lambda: torch.ones(n))  # 4 MiB, held as the output
    two = call_peak_bytes(lambda: torch.ones(n) + torch.ones(n))  # three buffers alive at the peak
    assert one >= 4 * n and two >= 3 * 4 * n
    x = torch.ones(n)
    assert call_peak_bytes(lambda: x.mul_(1.0)) < 4096  # in place: nothing new


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_call_peak_grows_with_the_batch(name):
    model, x = next((m, x) for n, m, x in _models() if n == name)
    with torch.inference_mode():
        small = call_peak_bytes(lambda: model(x[:2]))
        large = call_peak_bytes(lambda: model(x))
    assert 0 < small < large


def test_onnx_session_memory_includes_its_weights(tmp_path):
    model = tk.create_model("mlp", hidden=(512, 512)).eval()  # ~1.3 MB of fp32 weights
    x = torch.randn(16, 64)
    path = tk.export(model, x, tmp_path / "m.onnx", format="onnx", verbose=False).path
    weights = sum(p.numel() * 4 for p in model.parameters())
    peak = onnx_process_peak_bytes(path, x, threads=1)
    assert weights <= peak < 50 * weights
    with pytest.raises(RuntimeError, match="failed"):
        onnx_process_peak_bytes(path, torch.randn(16, 3), threads=1)  # wrong input width
