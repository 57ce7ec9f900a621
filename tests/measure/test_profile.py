"""``tk.profile``: operator and module tables, a bounded gzipped trace, memory, FLOPs/MFU, and a model
left exactly as it was found. Tiny models on CPU, one thread; no timing assertions."""

from __future__ import annotations

import doctest
import gzip
import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure import ProfileResult, profile, write_bounded_trace
from torchkiln.zoo import create_model

SCHEMA_KEYS = {
    "model",
    "mode",
    "batch_size",
    "steps",
    "top_ops",
    "modules",
    "flops_per_step",
    "uncounted_ops",
    "achieved_flops_per_s",
    "peak_flops_per_s",
    "mfu",
    "step_ms",
    "memory",
}


def _tiny(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], object]:
    """A small zoo model, its example inputs and a cross-entropy loss against fixed targets."""
    torch.manual_seed(0)
    if name == "gpt-tiny":
        model = create_model("gpt-tiny", n_layer=2, n_embd=32, n_head=2, seq_len=16, vocab_size=64)
        inputs = model.example_inputs(2)
        targets = torch.randint(0, 64, (2, 16))
    else:
        model = create_model("resnet-tiny", widths=(8, 16), blocks_per_stage=(1, 1))
        inputs = model.example_inputs(4)
        targets = torch.randint(0, 10, (4,))

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))

    return model, inputs, loss_fn


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple]:
    """One profile per (model, mode), shared by the tests below (profiling is the slow part)."""
    out = {}
    for name in ("resnet-tiny", "gpt-tiny"):
        for mode in ("train", "inference"):
            model, inputs, loss_fn = _tiny(name)
            before = _snapshot(model)
            modes_before = [m.training for m in model.modules()]
            res = profile(
                model,
                inputs,
                mode=mode,
                loss_fn=loss_fn if mode == "train" else None,
                wait=1,
                warmup=1,
                active=2,
                out_dir=tmp_path_factory.mktemp(f"{name}-{mode}"),
                peak=None,
                threads=1,
            )
            out[(name, mode)] = (model, before, modes_before, res)
    return out


CASES = [(n, m) for n in ("resnet-tiny", "gpt-tiny") for m in ("train", "inference")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_operator_table(profiles, case):
    _, _, _, res = profiles[case]
    assert isinstance(res, ProfileResult)
    names = [row["name"] for row in res.op_table]
    wanted = {"aten::convolution", "aten::mkldnn_convolution", "aten::_convolution"}
    if case[0] == "gpt-tiny":
        wanted = {"aten::mm", "aten::addmm"}
    assert wanted & set(names), names
    assert not any(n.startswith(("module::", "kiln::", "ProfilerStep")) for n in names)
    for row in res.op_table:
        assert row["self_ms"] >= 0 and row["total_ms"] >= row["self_ms"] - 1e-6 and row["calls"] >= 1
        assert 0 <= row["self_pct"] <= 100 and isinstance(row["input_shapes"], str)
    mm = next(r for r in res.op_table if r["name"] in wanted)
    assert mm["input_shapes"].startswith("[[")  # record_shapes gave the costliest shape group
    if case[1] == "train":
        assert any("Backward" in n or "backward" in n for n in names)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_module_table_names_real_submodules(profiles, case):
    model, _, _, res = profiles[case]
    real = {name or "(root)": type(m).__name__ for name, m in model.named_modules()}
    rows = {row["name"]: row for row in res.module_table}
    assert rows and set(rows) <= set(real)
    for name, row in rows.items():
        assert row["type"] == real[name] and row["calls"] == res.steps and row["total_ms"] >= 0
    expected = {"blocks.0", "blocks.1.attn", "lm_head"} if case[0] == "gpt-tiny" else {"stem.0", "blocks.0"}
    assert expected <= set(rows)
    assert rows["(root)"]["total_ms"] >= max(r["total_ms"] for n, r in rows.items() if n != "(root)") - 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_trace_is_gzipped_json(profiles, case):
    _, _, _, res = profiles[case]
    path = Path(res.trace_path)
    assert path.name == "trace.json.gz" and path.exists()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    names = {e.get("name") for e in data["traceEvents"]}
    assert any(str(n).startswith("ProfilerStep#") for n in names)
    assert any(str(n).startswith("module::") for n in names)
    assert data["kiln"]["dropped_events"] == 0 == res.trace["dropped_events"]
    assert res.trace["bytes"] == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["trace.json.gz"]  # the raw export is removed


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_model_left_as_found(profiles, case):
    model, before, modes_before, _ = profiles[case]
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():  # weights and BatchNorm statistics alike
        assert torch.equal(value, after[key]), key
    assert [m.training for m in model.modules()] == modes_before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_results_follow_the_schema(profiles, case):
    _, _, _, res = profiles[case]
    results = res.to_results(model_name=case[0])
    assert SCHEMA_KEYS <= set(results)
    assert results["model"] == case[0] and results["mode"] == case[1] and results["steps"] == 2
    assert results["batch_size"] == (2 if case[0] == "gpt-tiny" else 4)
    assert results["threads"] == 1
    json.dumps(results, allow_nan=False)
    mem = results["memory"]
    assert mem["source"] == "profiler memory events (CPU)"
    assert mem["timeline"] and set(mem["timeline"][0]) == {"t_ms", "bytes"}
    assert mem["peak_bytes"] >= max(p["bytes"] for p in mem["timeline"])
    assert mem["peak_bytes"] >= mem["start_bytes"] > 0
    if case[1] == "train":
        assert mem["peak_above_start_bytes"] > 0  # activations and gradients were allocated
    assert results["flops_per_step"] > 0 and results["step_ms"] > 0 and results["profiled_step_ms"] > 0
    assert results["mfu"] is None and results["peak_flops_per_s"] is None  # peak=None: no MFU
    assert results["achieved_flops_per_s"] == pytest.approx(
        results["flops_per_step"] / results["step_ms"] * 1e3
    )


def test_trace_size_is_bounded(tmp_path):
    model, inputs, loss_fn = _tiny("gpt-tiny")
    res = profile(
        model,
        inputs,
        loss_fn=loss_fn,
        wait=0,
        warmup=1,
        active=1,
        out_dir=tmp_path,
        max_trace_mb=0.01,
        peak=None,
    )
    size = Path(res.trace_path).stat().st_size
    assert size <= 10_000
    assert res.trace["dropped_events"] > 0 and res.trace["bytes"] == size
    with gzip.open(res.trace_path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    assert data["kiln"]["dropped_events"] == res.trace["dropped_events"]
    # The longest events survive: the step itself is still there.
    assert any(str(e.get("name", "")).startswith("ProfilerStep#") for e in data["traceEvents"])


def test_write_bounded_trace_drops_shortest_first(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "x"}}]
    events += [{"ph": "X", "name": f"op{i}", "ts": i, "dur": i, "pid": 1, "tid": 1} for i in range(2000)]
    events += [{"ph": "i", "name": "[memory]", "ts": i, "pid": 1, "tid": 1} for i in range(500)]
    src = tmp_path / "t.json"
    src.write_text(json.dumps({"traceEvents": events}))
    full = write_bounded_trace(src, tmp_path / "full.json.gz", 10**9)
    assert full["dropped_events"] == 0 and full["events"] == len(events)
    info = write_bounded_trace(src, tmp_path / "small.json.gz", 4000)
    assert info["bytes"] <= 4000 and info["dropped_events"] > 500
    with gzip.open(tmp_path / "small.json.gz", "rt") as f:
        kept = json.load(f)["traceEvents"]
    assert kept[0]["ph"] == "M"  # metadata always kept
    durations = [e["dur"] for e in kept if e["ph"] == "X"]
    assert not any(e["ph"] == "i" for e in kept)  # zero-length events went first
    assert durations == sorted(durations) and durations[-1] == 1999  # the longest kept, order preserved
    assert min(durations) == 2000 - len(durations)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_flops_of_linear_and_conv_match_hand_counts(mode, tmp_path):
    n, cin, cout, k, h = 2, 3, 8, 3, 10
    conv = nn.Conv2d(cin, cout, k, padding=1)
    conv_fwd = 2 * n * cout * cin * k * k * h * h  # output is h x h with padding 1
    lin = nn.Linear(16, 32)
    lin_fwd = 2 * 8 * 16 * 32  # the bias add is not a multiply-add
    # In training the input needs no gradient, so backward adds only the weight gradient: one more GEMM.
    factor = 2 if mode == "train" else 1

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    for model, x, fwd in ((lin, torch.randn(8, 16), lin_fwd), (conv, torch.randn(n, cin, h, h), conv_fwd)):
        res = profile(
            model,
            x,
            mode=mode,
            loss_fn=loss if mode == "train" else None,
            wait=0,
            warmup=0,
            active=1,
            out_dir=tmp_path / type(model).__name__,
            peak=1e12,
        )
        assert res.flops.total == factor * fwd
        assert res.to_results()["flops_per_step"] == factor * fwd
        assert res.mfu == pytest.approx(res.achieved_flops_per_s / 1e12)


def test_train_mode_needs_a_loss(tmp_path):
    model, inputs, _ = _tiny("gpt-tiny")
    with pytest.raises(KilnError, match="loss_fn"):
        profile(model, inputs, out_dir=tmp_path, peak=None, active=1, wait=0, warmup=0)


class _LossModel(nn.Module):
    """Returns its own loss, as Hugging Face models do given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.lin(x), labels)}


def test_model_loss_dict_inputs_and_a_user_optimizer_left_as_found(tmp_path):
    torch.manual_seed(0)
    model = _LossModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    inputs = {"x": torch.randn(5, 4), "labels": torch.randint(0, 3, (5,))}
    model(**inputs)["loss"].backward()
    opt.step()  # the optimizer has state; the model has gradients
    before, grads = _snapshot(model), [p.grad for p in model.parameters()]
    opt_before = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    res = profile(
        model, inputs, optimizer=opt, wait=0, warmup=1, active=2, out_dir=tmp_path, peak=None, row_limit=500
    )
    assert {"aten::addcdiv_", "aten::_foreach_addcdiv_", "aten::_fused_adam_"} & {
        r["name"] for r in res.op_table
    }
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert {id(k) for k in opt.state} == {id(k) for k in opt_before}
    for param, state in opt.state.items():
        for name, value in state.items():
            assert torch.equal(value, opt_before[param][name])


def test_bad_arguments_are_clear_errors(tmp_path):
    lin = nn.Linear(2, 2)
    with pytest.raises(KilnError, match="mode"):
        profile(lin, torch.randn(1, 2), mode="eval", out_dir=tmp_path)
    with pytest.raises(KilnError, match="precision"):
        profile(lin, torch.randn(1, 2), mode="inference", precision="int8", out_dir=tmp_path)
    with pytest.raises(KilnError, match="peak"):
        profile(lin, torch.randn(1, 2), mode="inference", peak="fast", out_dir=tmp_path)


def test_bf16_inference_runs(tmp_path):
    model, inputs, _ = _tiny("resnet-tiny")
    res = profile(model, inputs, mode="inference", precision="bf16", active=1, out_dir=tmp_path, peak=None)
    assert res.precision == "bf16" and res.op_table


@pytest.mark.parametrize("name", ["torchkiln.measure.profile", "torchkiln.measure._step"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
