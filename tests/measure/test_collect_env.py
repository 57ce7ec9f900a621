"""collect_env: keys present, JSON-serialisable, no personal data."""

from __future__ import annotations

import json
import socket

import torch

from torchkiln.measure import CPU_FLAGS, collect_env, flops


def test_collect_env_keys():
    env = collect_env()
    assert {"python", "platform", "packages", "torch", "cpu", "cuda", "git_commit"} <= set(env)
    assert env["torch"]["version"] == torch.__version__
    optional = {"torchao", "torch_pruning", "onnx", "onnxruntime", "transformers", "tensorboard", "fastapi"}
    assert optional <= set(env["packages"])
    cpu = env["cpu"]
    assert set(cpu["flags"]) == set(CPU_FLAGS) and all(isinstance(v, bool) for v in cpu["flags"].values())
    assert cpu["torch_threads"] == torch.get_num_threads()
    assert cpu["logical_cores"] >= 1 and cpu["model"]
    assert env["cuda"]["available"] == torch.cuda.is_available()
    assert len(env["cuda"]["devices"]) == env["cuda"]["device_count"]
    assert "peak_flops" not in env
    text = json.dumps(env)
    hostname = socket.gethostname()
    assert not hostname or hostname not in text


def test_collect_env_with_peak_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHKILN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(flops, "_measure_gemm_peak", lambda d, dev: (calls.append(d), (1e11, 1024))[1])
    env = collect_env(measure_peak=True)
    if not torch.cuda.is_available():
        assert set(env["peak_flops"]) == {"float32", "bfloat16"}
        assert env["peak_flops_source"]["cached"] == {"float32": False, "bfloat16": False}
    again = collect_env(measure_peak=True)
    assert all(again["peak_flops_source"]["cached"].values())
    assert again["peak_flops"] == env["peak_flops"]
    assert len(calls) == len(env["peak_flops"])
