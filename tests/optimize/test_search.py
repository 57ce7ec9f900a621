"""tk.optimize end to end on a small MLP (no compile): measurement, skips with reasons, the budget in the
search loop, branch pruning, resume from the cache, and the chosen artifact."""

import pytest
import torch

import torchkiln as tk
from torchkiln.optimize import Candidate, CandidateResult, agreement_evaluator, optimize
from torchkiln.optimize import search as search_mod


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(64,)).eval()
    x = torch.randn(48, 64)
    return model, x


def test_measures_skips_with_reasons_and_saves_a_loadable_artifact(mlp, tmp_path):
    model, x = mlp
    cands = [Candidate(), Candidate(runtime="torchscript"), Candidate(channels_last=True)]
    res = optimize(
        model,
        x,
        agreement_evaluator(model, x, 16),
        batch_size=16,
        quick=True,
        candidates=cands,
        out_dir=tmp_path,
        report=True,
    )
    by = {c.key: c for c in res.candidates}
    assert by["eager"].status == "ok" and by["eager"].accuracy == 1.0 and by["eager"].size_bytes > 0
    assert by["torchscript"].status == "ok" and by["torchscript"].speedup > 0
    assert by["torchscript"].accuracy == 1.0
    # every measured candidate carries the sustained-rate ratio and a memory figure saying its source
    for key in ("eager", "torchscript"):
        assert by[key].throughput_gain > 0 and by[key].latency_p90_ms >= by[key].measured_latency_ms
        assert by[key].memory_bytes >= by[key].size_bytes and "allocator peak" in by[key].memory_source
    skipped = by["eager+channels_last"]
    assert skipped.status == "skipped" and "4-d" in skipped.why
    # whatever was chosen (or the baseline), the saved artifact serves the model's outputs
    assert res.artifact is not None and res.artifact_format in ("torchscript", "export", "onnx")
    predictor = tk.load_predictor(res.artifact)
    torch.testing.assert_close(predictor(x[:16]), model(x[:16]), rtol=1e-4, atol=1e-4)
    assert res.recipe_fragment.read_text().startswith("\n[optimize]")
    html = res.report.read_text()
    assert (
        "torchscript" in html and "eager" in html and "peak memory" in html and "Objective: latency" in html
    )
    assert res.to_results()["skipped"]["eager+channels_last"] == skipped.why


def _scripted(table):
    """A stand-in for measuring: (speedup, accuracy, size) per candidate key; counts the calls."""
    calls = []

    def run(cand, ctx, baseline_built, baseline_call, evaluator, base_res, x, quick):
        calls.append(cand.key)
        speedup, acc, size = table[cand.key]
        return CandidateResult(
            cand.key,
            cand.to_dict(),
            "ok",
            speedup=speedup,
            accuracy=acc,
            size_bytes=size,
            latency_ms=1.0 / speedup,
            baseline_latency_ms=1.0,
        )

    return run, calls


def test_budget_branches_and_resume(mlp, tmp_path, monkeypatch):
    model, x = mlp
    table = {
        "eager": (1.0, 0.95, 100),
        "onnxruntime": (2.0, 0.95, 100),
        "int8-dynamic+eager": (9.0, 0.80, 30),  # fastest, over budget: never chosen
        "prune0.25+distill+eager": (1.5, 0.948, 60),
        "prune0.25+distill+onnxruntime": (3.0, 0.948, 60),
        "prune0.5+distill+eager": (2.0, 0.90, 40),  # over budget: its branch and larger ratios stop
        "prune0.5+distill+onnxruntime": (5.0, 0.90, 40),
        "prune0.75+distill+eager": (4.0, 0.5, 20),
    }
    cands = [Candidate(), Candidate(runtime="onnxruntime"), Candidate(quant="int8-dynamic")]
    for r in (0.25, 0.5, 0.75):
        cands += [Candidate(prune=r)] + ([Candidate(prune=r, runtime="onnxruntime")] if r < 0.75 else [])
    run, calls = _scripted(table)
    monkeypatch.setattr(search_mod, "_run_candidate", run)
    kwargs = dict(batch_size=16, candidates=cands, out_dir=tmp_path, export_chosen=False, report=False)
    res = optimize(model, x, lambda f: 0.0, **kwargs)
    assert res.chosen.key == "prune0.25+distill+onnxruntime"
    by = {c.key: c for c in res.candidates}
    assert by["int8-dynamic+eager"].within_budget is False
    assert by["prune0.5+distill+onnxruntime"].status == "skipped"
    assert "over the accuracy budget" in by["prune0.5+distill+onnxruntime"].why
    largest = by["prune0.75+distill+eager"]
    assert largest.status == "skipped" and "larger ratio" in largest.why
    assert len(calls) == 6 and res.measured == 6
    assert "int8-dynamic+eager" not in res.front or by["int8-dynamic+eager"].accuracy < 0.94

    # resume: nothing is measured again, and the same choice comes out
    run2, calls2 = _scripted(table)
    monkeypatch.setattr(search_mod, "_run_candidate", run2)
    again = optimize(model, x, lambda f: 0.0, **kwargs)
    assert calls2 == [] and again.reused == 6 and again.measured == 0
    assert again.chosen.key == res.chosen.key


@pytest.mark.parametrize("store", ["json", "history"])
def test_interrupted_search_resumes_where_it_stopped(mlp, tmp_path, monkeypatch, store):
    from torchkiln.report.history import History

    model, x = mlp
    history = History(tmp_path / "history.sqlite") if store == "history" else None
    table = {"eager": (1.0, 0.9, 10), "onnxruntime": (2.0, 0.9, 10), "torchscript": (1.5, 0.9, 10)}
    cands = [Candidate(), Candidate(runtime="onnxruntime"), Candidate(runtime="torchscript")]
    run, calls = _scripted(table)

    def dies_on_torchscript(cand, *args):
        if cand.key == "torchscript":
            raise KeyboardInterrupt
        return run(cand, *args)

    monkeypatch.setattr(search_mod, "_run_candidate", dies_on_torchscript)
    kwargs = dict(
        batch_size=16, candidates=cands, out_dir=tmp_path, export_chosen=False, report=False, history=history
    )
    with pytest.raises(KeyboardInterrupt):
        optimize(model, x, lambda f: 0.0, **kwargs)
    # with a history the finished candidates live in its database, not in a file beside the output
    assert (tmp_path / "optimize-cache.json").exists() == (store == "json")
    if history is not None:
        assert history.list(kind="optimize") == []  # the interrupted run recorded no result...
        [namespace] = {n for n in _namespaces(history)}
        assert set(history.cache_get(namespace)) == {"eager", "onnxruntime"}  # ...but kept its work
    run2, calls2 = _scripted(table)
    monkeypatch.setattr(search_mod, "_run_candidate", run2)
    res = optimize(model, x, lambda f: 0.0, **kwargs)
    assert calls2 == ["torchscript"] and res.reused == 2
    # fresh=True forgets them and measures everything again
    run3, calls3 = _scripted(table)
    monkeypatch.setattr(search_mod, "_run_candidate", run3)
    again = optimize(model, x, lambda f: 0.0, fresh=True, **kwargs)
    assert calls3 == ["eager", "onnxruntime", "torchscript"] and again.reused == 0


def _namespaces(history):
    import sqlite3

    with sqlite3.connect(history.path) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT namespace FROM cache")]


def test_quick_results_are_not_reused_by_a_full_search(mlp, tmp_path, monkeypatch):
    model, x = mlp
    table = {"eager": (1.0, 0.9, 10), "onnxruntime": (2.0, 0.9, 10)}
    cands = [Candidate(), Candidate(runtime="onnxruntime")]
    kwargs = dict(batch_size=16, candidates=cands, out_dir=tmp_path, export_chosen=False, report=False)
    run, calls = _scripted(table)
    monkeypatch.setattr(search_mod, "_run_candidate", run)
    optimize(model, x, lambda f: 0.0, quick=True, **kwargs)
    run2, calls2 = _scripted(table)
    monkeypatch.setattr(search_mod, "_run_candidate", run2)
    assert optimize(model, x, lambda f: 0.0, quick=True, **kwargs).reused == 2 and calls2 == []
    full = optimize(model, x, lambda f: 0.0, **kwargs)  # short timing is not precise enough for it
    assert calls2 == ["eager", "onnxruntime"] and full.reused == 0
    run3, calls3 = _scripted(table)
    monkeypatch.setattr(search_mod, "_run_candidate", run3)
    assert optimize(model, x, lambda f: 0.0, quick=True, **kwargs).reused == 2  # full ones serve quick


def test_time_budget_stops_new_candidates(mlp, tmp_path, monkeypatch):
    model, x = mlp
    run, calls = _scripted({"eager": (1.0, 0.9, 10), "onnxruntime": (2.0, 0.9, 10)})
    monkeypatch.setattr(search_mod, "_run_candidate", run)
    res = optimize(
        model,
        x,
        lambda f: 0.0,
        batch_size=16,
        candidates=[Candidate(), Candidate(runtime="onnxruntime")],
        out_dir=tmp_path,
        export_chosen=False,
        report=False,
        time_budget_s=0.0,
    )
    assert calls == ["eager"]
    assert res.stopped_early and "time budget" in res.stopped_early
    assert res.chosen is None and "nothing beats" in res.message


def test_report_headline_names_the_choice_not_the_fastest():
    from torchkiln.report.history import Run
    from torchkiln.report.html import headline

    variants = [
        {"name": "eager", "latency_ms": {"p50": 2.0}, "speedup_vs_baseline": 1.0, "accuracy": 0.9},
        {"name": "fast", "latency_ms": {"p50": 1.0}, "speedup_vs_baseline": 2.0, "accuracy": 0.5},
        {"name": "ok", "latency_ms": {"p50": 1.5}, "speedup_vs_baseline": 1.4, "accuracy": 0.9},
    ]
    chosen = headline(Run("x", "optimize", "m", "now", results={"chosen": "ok", "variants": variants}))
    assert chosen["won"] and chosen["winner"] == "ok"
    none = headline(Run("x", "optimize", "m", "now", results={"chosen": None, "variants": variants}))
    assert not none["won"] and "Nothing was chosen" in none["text"]


@pytest.mark.skipif(
    not __import__("torchkiln.measure.variants", fromlist=["x"]).cpu_bf16_supported(),
    reason="needs native bf16 on this CPU",
)
def test_a_chosen_bf16_candidate_is_exported_with_autocast_inside(mlp, tmp_path, monkeypatch):
    model, x = mlp
    run, _ = _scripted({"eager": (1.0, 0.9, 10), "eager+bf16": (2.0, 0.9, 10)})
    monkeypatch.setattr(search_mod, "_run_candidate", run)
    res = optimize(
        model,
        x,
        lambda f: 0.0,
        batch_size=16,
        candidates=[Candidate(), Candidate(precision="bf16")],
        out_dir=tmp_path,
        report=False,
    )
    assert res.chosen.key == "eager+bf16" and res.artifact_format == "export", res.notes
    predictor = tk.load_predictor(res.artifact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x[:16]).float()
    got = predictor(x[:16])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
