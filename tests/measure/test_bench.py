"""tk.bench and the inference variants: pairing math, result structure, sweeps, and clear refusals.

Speed is not asserted (BENCHMARKING.md); the interleaved ratios are a correctness check of the pairing
with generous bounds, on deterministic CPU work at 1 thread.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure import bench, interleaved_compare, list_variants, set_threads
from torchkiln.measure.variants import (
    Autocast,
    ChannelsLast,
    Compile,
    VariantError,
    VariantUnavailableError,
    apply_variant,
    describe_variants,
    get_variant,
)
from torchkiln.report.schema import BENCH_VARIANT_KEYS
from torchkiln.zoo import create_model

bench_module = importlib.import_module("torchkiln.measure.bench")  # the package re-exports bench() as bench
variants_module = importlib.import_module("torchkiln.measure.variants")

FAST = {"max_time_s": 0.3, "min_time_s": 0.05, "min_warmup_s": 0.0, "warmup": 2, "min_rounds": 5}
REQUIRED_KEYS = ("name", "latency_ms", "rounds", "throughput_per_s", "speedup_vs_baseline", "speedup_iqr")


@pytest.mark.parametrize("name", ["torchkiln.measure.bench", "torchkiln.measure.variants"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- pairing


def _matmul_work(repeats: int):
    a, b = torch.randn(96, 96), torch.randn(96, 96)
    out = torch.empty(96, 96)

    def work() -> None:
        for _ in range(repeats):
            torch.mm(a, b, out=out)

    return work


def test_interleaved_ratio_is_one_for_identical_work_and_two_for_double():
    with set_threads(1):
        c = interleaved_compare(
            {"base": _matmul_work(8), "same": _matmul_work(8), "double": _matmul_work(16)},
            warmup=3,
            min_rounds=30,
            max_rounds=400,
            min_time_s=0.5,
            target_iqr=0.05,
            max_time_s=4.0,
        )
    assert c.baseline == "base" and c.rounds >= 30
    assert c.ratios["base"].speedup == 1.0 and c.ratios["base"].iqr == 0.0
    assert 0.8 <= c.ratios["same"].speedup <= 1.25, c.ratios["same"]
    assert 1.6 <= c.ratios["double"].time_ratio <= 2.5, c.ratios["double"]
    assert c.ratios["double"].speedup < 1
    # every variant was timed in every round; the ratios pair rounds one to one
    assert {len(t.times) for t in c.timings.values()} == {c.rounds}
    assert c.ratios["double"].times_a == c.timings["base"].times


def test_interleaved_order_alternates():
    calls: list[str] = []
    interleaved_compare(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")},
        warmup=0,
        min_rounds=2,
        max_rounds=2,
    )
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["c", "b", "a"]  # first calls, then rounds


def test_interleaved_rejects_unknown_baseline():
    with pytest.raises(KilnError, match="baseline 'z'"):
        interleaved_compare({"a": lambda: None}, baseline="z")


# ---------------------------------------------------------------------------------------------- bench


def _check_structure(results: dict, names: list[str], batch_size: int) -> None:
    assert results["batch_size"] == batch_size and results["threads"] == 1 and results["device"] == "cpu"
    assert results["baseline"] == names[0]
    assert [v["name"] for v in results["variants"]] == names
    for v in results["variants"]:
        assert set(REQUIRED_KEYS) <= set(v) and set(v) & set(BENCH_VARIANT_KEYS) == set(REQUIRED_KEYS)
        lat = v["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["iqr"] >= 0 and v["rounds"] >= FAST["min_rounds"]
        assert v["throughput_per_s"] == pytest.approx(batch_size / (lat["p50"] / 1e3))
    base = results["variants"][0]
    assert base["speedup_vs_baseline"] == 1.0 and base["speedup_iqr"] == 0.0


def test_bench_mlp_structure_threads_and_mode_restored():
    model = create_model("mlp", hidden=(32,))
    model.train()
    before = torch.get_num_threads()
    result = bench(model, batch_size=8, name="mlp", **FAST)
    assert torch.get_num_threads() == before and model.training
    results = result.to_results()
    _check_structure(results, ["fp32"], 8)
    assert results["model"] == "mlp" and result.winner == "fp32" and "sweep" not in results
    assert results["warmup"] >= FAST["warmup"] and isinstance(results["converged"], bool)


def test_bench_cnn_variants_leave_the_model_alone():
    model = create_model("resnet-tiny", widths=(8, 16), blocks_per_stage=(1, 1))
    x = torch.rand(4, 1, 8, 8)
    names = ["fp32", "channels_last"]
    if variants_module.cpu_bf16_supported():
        names.append("channels_last+bf16")
    result = bench(model, x, variants=names, **FAST)
    _check_structure(result.to_results(), names, 4)
    assert result.winner in names
    assert all(p.is_contiguous() for p in model.parameters())  # channels_last converted a copy
    assert model.training  # eval for the run, the mode it came in afterwards


def test_bench_inputs_forms():
    model = nn.Linear(6, 3)
    x = torch.randn(5, 6)
    assert bench(model, x, **FAST).batch_size == 5
    assert bench(model, (x,), batch_size=12, **FAST).batch_size == 12  # tiled along dim 0
    assert bench(model, {"input": x}, **FAST).batch_size == 5
    assert bench(model, lambda bs: torch.randn(bs, 6), batch_size=3, **FAST).batch_size == 3
    with pytest.raises(KilnError, match="example_inputs"):
        bench(model)
    with pytest.raises(KilnError, match="baseline 'bf16' is not among"):
        bench(model, x, variants=("fp32",), baseline="bf16")
    with pytest.raises(KilnError, match="more than once"):
        bench(model, x, variants=("fp32", "fp32"))


def test_resize_batch_and_oom_detection():
    x = torch.arange(6).reshape(3, 2)
    tiled = bench_module.resize_batch((x, torch.tensor(1.0)), 7)
    assert tiled[0].shape == (7, 2) and tiled[0][:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0]
    assert tiled[1].shape == ()
    assert bench_module.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert bench_module.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert bench_module.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert bench_module.is_out_of_memory(MemoryError())
    assert not bench_module.is_out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------------------------- sweep


def test_sweep_stops_at_the_latency_ceiling():
    model = create_model("mlp", hidden=(16,))
    result = bench(model, batch_size=4, sweep=True, latency_ceiling_ms=1e-6, sweep_time_s=0.05, **FAST)
    results = result.to_results()
    assert [p["batch_size"] for p in results["sweep"]] == [1]
    assert results["sweep"][0]["within_ceiling"] is False
    assert results["sweep_stopped"].startswith("latency ceiling 1e-06 ms at batch 1")


def test_sweep_runs_to_max_batch():
    model = create_model("mlp", hidden=(16,))
    result = bench(model, batch_size=2, sweep=True, max_batch_size=6, sweep_time_s=0.02, **FAST)
    results = result.to_results()
    assert [p["batch_size"] for p in results["sweep"]] == [1, 2, 4, 6]
    assert results["sweep_stopped"] == "max batch 6"
    for p in results["sweep"]:
        assert p["variant"] == "fp32" and p["throughput_per_s"] > 0 and p["latency_p50_ms"] > 0


class _RunsOutOfMemory(nn.Module):
    def __init__(self, limit: int, exc: BaseException) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.limit, self.exc = limit, exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise self.exc
        return self.lin(x)


@pytest.mark.parametrize(
    "exc",
    [torch.OutOfMemoryError("simulated"), RuntimeError("CUDA out of memory (simulated)"), MemoryError()],
    ids=["OutOfMemoryError", "RuntimeError", "MemoryError"],
)
def test_sweep_stops_at_out_of_memory(exc):
    model = _RunsOutOfMemory(limit=4, exc=exc)
    result = bench(model, lambda bs: torch.randn(bs, 4), batch_size=2, sweep=True, sweep_time_s=0.02, **FAST)
    results = result.to_results()
    assert [p["batch_size"] for p in results["sweep"]] == [1, 2, 4]
    assert results["sweep_stopped"] == "out of memory at batch 8"


def test_sweep_other_errors_propagate():
    model = _RunsOutOfMemory(limit=1, exc=ValueError("a real bug"))
    with pytest.raises(ValueError, match="a real bug"):
        bench(model, lambda bs: torch.randn(bs, 4), batch_size=1, sweep=True, sweep_time_s=0.02, **FAST)


# ---------------------------------------------------------------------------------------------- variants


def test_registry_lists_and_describes_requirements():
    assert list_variants() == ["bf16", "channels_last", "compile", "compile-max-autotune", "fp16", "fp32"]
    needs = {d["name"]: d["needs"] for d in describe_variants()}
    assert needs["bf16"] == ["bf16"] and needs["fp16"] == ["cuda"] and needs["compile"] == ["compile"]
    assert needs["channels_last"] == ["4d-input"] and needs["fp32"] == []
    assert get_variant("compile-max-autotune").parts == (Compile("max-autotune"),)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(VariantError) as info:
        bench(nn.Linear(2, 2), torch.randn(2, 2), variants=("fp32", "fp8"), **FAST)
    message = str(info.value)
    assert "unknown variant 'fp8'" in message
    assert all(name in message for name in list_variants())


def test_bf16_without_hardware_support_is_refused(monkeypatch):
    monkeypatch.setattr(variants_module, "cpu_bf16_supported", lambda: False)
    timed = []
    monkeypatch.setattr(bench_module, "interleaved_compare", lambda *a, **k: timed.append(1))
    with pytest.raises(VariantUnavailableError) as info:
        bench(nn.Linear(4, 2), torch.randn(3, 4), variants=("fp32", "bf16"), **FAST)
    message = str(info.value)
    assert "variant 'bf16' cannot run" in message and "no native bfloat16" in message
    assert "avx512_bf16" in message
    assert timed == []  # refused before anything was timed: no silent fallback to fp32


def test_bf16_with_support_runs_in_bfloat16(monkeypatch):
    monkeypatch.setattr(variants_module, "cpu_bf16_supported", lambda: True)
    out = apply_variant("bf16", nn.Linear(4, 2), device="cpu")(torch.randn(3, 4))
    assert out.dtype == torch.bfloat16


def test_requirements_fail_clearly(monkeypatch):
    with pytest.raises(VariantUnavailableError, match="CUDA only"):
        apply_variant("fp16", nn.Linear(2, 2), device="cpu")
    with pytest.raises(VariantUnavailableError, match=r"4-d \(N, C, H, W\) input"):
        bench(nn.Linear(4, 2), torch.randn(3, 4), variants=("channels_last",), **FAST)
    monkeypatch.setattr(variants_module, "_cxx_compiler", lambda: None)
    with pytest.raises(VariantUnavailableError, match="C\\+\\+ compiler"):
        apply_variant("compile", nn.Linear(2, 2), device="cpu")


def test_composition_orders_parts_and_rejects_duplicates():
    spec = get_variant("bf16+channels_last")
    assert spec.parts == (ChannelsLast(), Autocast("bf16")) and set(spec.needs) == {"bf16", "4d-input"}
    assert get_variant("fp32+compile").parts == (Compile("default"),)
    with pytest.raises(VariantError, match="more than one Compile"):
        get_variant("compile+compile-max-autotune")
    with pytest.raises(VariantError, match="unknown variant 'fp64' in 'fp32\\+fp64'"):
        get_variant("fp32+fp64")


def test_variants_run_under_inference_mode_and_match_eager():
    model = create_model("resnet-tiny", widths=(8,), blocks_per_stage=(1,)).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    out = apply_variant("channels_last", model)(x)
    assert torch.is_inference(out) and torch.allclose(out, expected, atol=1e-5)


def test_compiled_runs_fail_loudly_instead_of_falling_back():
    import torch._dynamo.config as dynamo_config

    with bench_module._no_silent_recompile_fallback(True, 40):
        assert dynamo_config.fail_on_recompile_limit_hit is True
        assert dynamo_config.recompile_limit >= 48
    with bench_module._no_silent_recompile_fallback(False, 40):
        assert dynamo_config.fail_on_recompile_limit_hit is False


@pytest.mark.slow
def test_compile_variant_runs_compiled():
    """The compile variant runs the inductor-compiled model under inference_mode (the first call
    compiles and is timed apart), matching eager."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    x = torch.randn(2, 8)
    result = bench(model, x, variants=("fp32", "compile"), **FAST)
    fp32, compiled = result.to_results()["variants"]
    assert compiled["name"] == "compile" and compiled["first_call_ms"] > fp32["first_call_ms"]
    assert type(apply_variant("compile", model).model).__name__ == "OptimizedModule"  # lazy: no compile


@pytest.mark.cuda
def test_cuda_fp16_and_bf16_variants():
    model = create_model("mlp", hidden=(64,)).cuda()
    names = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    result = bench(model, batch_size=16, variants=names, device="cuda", **FAST)
    results = result.to_results()
    assert results["device"].startswith("cuda") and [v["name"] for v in results["variants"]] == names
    assert apply_variant("fp16", model)(torch.randn(4, 64, device="cuda")).dtype == torch.float16
