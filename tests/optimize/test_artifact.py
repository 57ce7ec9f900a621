"""The chosen candidate's artifact (``write_chosen``) loads with ``load_predictor`` and ``kiln serve``,
runs the way the candidate was measured (dynamic int8 kernels, channels_last) and gives the candidate's
outputs at batch 1 and 5 (the batch dimension stays dynamic)."""

from __future__ import annotations

import asyncio
import zipfile

import httpx
import pytest
import torch

import torchkiln as tk
import torchkiln.export.core as export_core
from torchkiln.export import load_predictor
from torchkiln.optimize import Candidate, CandidateResult, agreement_evaluator, optimize
from torchkiln.optimize import search as search_mod
from torchkiln.optimize.artifact import write_chosen
from torchkiln.optimize.candidates import BuildContext, CandidateSkipped, build_candidate
from torchkiln.optimize.search import OptimizeResult

BATCH = 8


def _mlp():
    torch.manual_seed(0)
    return tk.create_model("mlp", hidden=(64, 64)).eval(), torch.randn(BATCH, 64)


def _gpt():
    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", vocab_size=64, seq_len=16, n_layer=2, n_embd=32).eval()
    return model, torch.randint(0, 64, (BATCH, 16))


def _cnn():
    torch.manual_seed(0)
    model = tk.create_model("resnet-tiny", in_channels=3, widths=(8, 16), blocks_per_stage=(1, 1)).eval()
    return model, torch.randn(BATCH, 3, 16, 16)


MODELS = {"mlp": _mlp, "gpt-tiny": _gpt, "resnet-tiny": _cnn}


def _inputs(x: torch.Tensor, batch: int) -> torch.Tensor:
    torch.manual_seed(batch)
    if x.dtype.is_floating_point:
        return torch.randn(batch, *x.shape[1:])
    return torch.randint(0, int(x.max()) + 1, (batch, *x.shape[1:]))


def _result(cand: Candidate) -> OptimizeResult:
    base = CandidateResult("eager", Candidate().to_dict(), "ok", speedup=1.0, accuracy=1.0)
    chosen = CandidateResult(cand.key, cand.to_dict(), "ok", speedup=2.0, accuracy=1.0)
    return OptimizeResult(
        baseline=base,
        candidates=[base, chosen],
        front=[chosen.key],
        chosen=chosen,
        objective="latency",
        accuracy_budget=0.01,
        batch_size=BATCH,
        threads=torch.get_num_threads(),
        model_hash="test",
        measured=2,
        reused=0,
    )


def _write(model, x, cand: Candidate, tmp_path):
    """write_chosen for ``cand`` as the choice; returns the result and the candidate built as measured."""
    work = tmp_path / "candidates"
    work.mkdir()
    ctx = BuildContext(model, x, work)
    try:
        measured = build_candidate(cand, ctx)
    except CandidateSkipped as exc:
        pytest.skip(f"{cand.key} cannot run here: {exc}")
    result = _result(cand)
    write_chosen(result, ctx, tmp_path, "model")
    assert result.artifact is not None and result.artifact.is_file(), result.notes
    assert result.artifact.parent == tmp_path / "chosen"
    assert f'format = "{result.artifact_format}"' in result.recipe_fragment.read_text()
    return result, measured


def _assert_matches(predictor, reference, x, atol: float, rtol: float) -> None:
    for batch in (1, 5):
        xb = _inputs(x, batch)
        with torch.inference_mode():
            got, want = predictor(xb), reference(xb)
        assert got.shape[0] == batch
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def _torchscript_graph(path) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return str(torch.jit.load(str(path)).inlined_graph)


# ------------------------------------------------------------------------------------------ dynamic int8


@pytest.mark.parametrize("arch", ["mlp", "gpt-tiny"])
def test_int8_dynamic_eager_is_saved_as_torchscript_with_its_int8_kernels(arch, tmp_path) -> None:
    model, x = MODELS[arch]()
    cand = Candidate(quant="int8-dynamic")
    result, measured = _write(model, x, cand, tmp_path)
    assert result.artifact_format == "torchscript", result.notes
    graph = _torchscript_graph(result.artifact)
    assert "quantized::linear_dynamic" in graph
    predictor = load_predictor(result.artifact)
    assert predictor.format == "torchscript"
    assert predictor.metadata["candidate"] == cand.key
    assert any("quantized::linear_dynamic" in n for n in predictor.metadata["notes"])
    _assert_matches(predictor, measured.run, x, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("arch", ["mlp", "gpt-tiny"])
def test_int8_dynamic_torchao_falls_back_to_torch_export_and_says_what_it_runs(
    arch, tmp_path, monkeypatch
) -> None:
    """Without AOTInductor the torchao model is saved as a torch.export program (its int8 ops run
    eagerly), with a note saying so; it still serves the candidate's outputs."""
    pytest.importorskip("torchao")
    monkeypatch.setattr(export_core, "aoti_unavailable_reason", lambda: "no C++ compiler (test)")
    model, x = MODELS[arch]()
    cand = Candidate(quant="int8-dynamic", runtime="compile")
    result, measured = _write(model, x, cand, tmp_path)
    assert result.artifact_format == "export", result.notes
    assert any("aoti export of int8-dynamic+compile failed" in n for n in result.notes)
    assert any("unfused" in n and "slower than measured" in n and "_int_mm" in n for n in result.notes)
    predictor = load_predictor(result.artifact)
    assert predictor.format == "export"
    graph = str(torch.export.load(str(result.artifact)).graph)
    assert "aten._int_mm" in graph
    # the program runs the eager torchao model's ops; measured.module is that model
    _assert_matches(predictor, measured.module, x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mlp", "gpt-tiny"])
def test_int8_weight_only_is_saved_with_its_int8_weights(arch, tmp_path, monkeypatch) -> None:
    """Weight-only int8 (torchao) takes the same torch export path; the artifact keeps int8 weights."""
    pytest.importorskip("torchao")
    monkeypatch.setattr(export_core, "aoti_unavailable_reason", lambda: "no C++ compiler (test)")
    model, x = MODELS[arch]()
    cand = Candidate(quant="int8-weight-only", runtime="compile")
    result, measured = _write(model, x, cand, tmp_path)
    assert result.artifact_format == "export", result.notes
    assert any("int8 weights dequantized" in n for n in result.notes)
    program = torch.export.load(str(result.artifact))
    # torchao's weight subclass reports the float dtype; its stored data is int8
    int8 = [t for t in program.state_dict.values() if getattr(t, "qdata", t).dtype == torch.int8]
    assert int8, "the saved program holds no int8 weights"
    _assert_matches(load_predictor(result.artifact), measured.module, x, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_int8_dynamic_torchao_is_saved_as_aoti_matching_the_compiled_candidate(tmp_path) -> None:
    pytest.importorskip("torchao")
    if export_core.aoti_unavailable_reason():
        pytest.skip(export_core.aoti_unavailable_reason())
    model, x = _gpt()
    cand = Candidate(quant="int8-dynamic", runtime="compile")
    result, measured = _write(model, x, cand, tmp_path)
    assert result.artifact_format == "aoti", result.notes
    predictor = load_predictor(result.artifact)
    assert predictor.format == "aoti" and predictor.metadata["candidate"] == cand.key
    with zipfile.ZipFile(result.artifact) as zf:
        wrapper = next(n for n in zf.namelist() if n.endswith("wrapper.cpp"))
        assert "_int_mm" in zf.read(wrapper).decode()
    _assert_matches(predictor, measured.run, x, atol=1e-2, rtol=1e-2)  # the compiled candidate


def test_optimize_choosing_int8_dynamic_serves_it(tmp_path, monkeypatch) -> None:
    """tk.optimize with int8-dynamic+eager as the winner: its artifact loads in kiln serve and answers
    concurrent requests (batched) with the quantized model's outputs."""
    from torchkiln.serve.app import ServerConfig, create_app
    from torchkiln.serve.model import load_served_model
    from torchkiln.serve.server import running_server

    model, x = _mlp()
    speedups = {"eager": 1.0, "int8-dynamic+eager": 3.0}

    def scripted(cand, *args):
        return CandidateResult(cand.key, cand.to_dict(), "ok", speedup=speedups[cand.key], accuracy=1.0)

    monkeypatch.setattr(search_mod, "_run_candidate", scripted)
    res = optimize(
        model,
        x,
        agreement_evaluator(model, x, BATCH),
        batch_size=BATCH,
        candidates=[Candidate(), Candidate(quant="int8-dynamic")],
        out_dir=tmp_path,
        report=False,
    )
    assert res.chosen.key == "int8-dynamic+eager" and res.artifact_format == "torchscript", res.notes
    served = load_served_model(str(res.artifact))
    assert served.format == "torchscript"
    xs = torch.randn(6, 64)
    app = create_app(served, ServerConfig(max_batch_size=4, max_delay_ms=50, threads=1))

    async def post_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/v1/predict", json={"inputs": {"x": row.tolist()}}) for row in xs)
            )

    with running_server(app) as url:
        responses = asyncio.run(post_all(url))
    assert [r.status_code for r in responses] == [200] * len(xs)
    got = torch.tensor([r.json()["outputs"]["output"] for r in responses])
    # quantize_dynamic scales activations per input tensor, so a request's outputs move by int8 rounding
    # with the requests it is batched with: compared with each row run alone, at int8 tolerance
    predictor = load_predictor(res.artifact)
    want = torch.cat([predictor(row[None]) for row in xs])
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    assert any("batched with" in n for n in res.notes)


# ------------------------------------------------------------------------------------------ channels_last


def test_channels_last_eager_is_saved_as_torchscript_in_channels_last(tmp_path) -> None:
    model, x = _cnn()
    cand = Candidate(channels_last=True)
    result, measured = _write(model, x, cand, tmp_path)
    assert result.artifact_format == "torchscript", result.notes
    graph = _torchscript_graph(result.artifact)
    assert "aten::contiguous" in graph  # the input converted inside the artifact
    predictor = load_predictor(result.artifact)
    assert predictor.input_names == ["x"]  # the wrapper keeps the model's input names
    assert predictor.metadata["candidate"] == cand.key
    _assert_matches(predictor, model, x, atol=1e-4, rtol=1e-3)
    _assert_matches(predictor, measured.run, x, atol=1e-4, rtol=1e-3)


def test_bf16_channels_last_is_saved_as_torch_export_in_channels_last(tmp_path) -> None:
    model, x = _cnn()
    cand = Candidate(precision="bf16", channels_last=True)
    result, measured = _write(model, x, cand, tmp_path)
    assert result.artifact_format == "export", result.notes
    program = torch.export.load(str(result.artifact))
    converts = [
        n
        for n in program.graph.nodes
        if n.target == torch.ops.aten.contiguous.default
        and n.kwargs.get("memory_format") == torch.channels_last
    ]
    assert converts, "the artifact does not convert its input to channels_last"
    weights = [t for t in program.state_dict.values() if t.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    predictor = load_predictor(result.artifact)
    _assert_matches(predictor, model, x, atol=0.1, rtol=0.05)
    _assert_matches(predictor, measured.run, x, atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_compile_bf16_channels_last_is_saved_as_aoti(tmp_path) -> None:
    if export_core.aoti_unavailable_reason():
        pytest.skip(export_core.aoti_unavailable_reason())
    model, x = _cnn()
    cand = Candidate(runtime="compile", precision="bf16", channels_last=True)
    result, _ = _write(model, x, cand, tmp_path)
    assert result.artifact_format == "aoti", result.notes
    predictor = load_predictor(result.artifact)
    assert predictor.format == "aoti" and predictor.metadata["candidate"] == cand.key
    assert any("channels_last" in n for n in predictor.metadata["notes"])
    _assert_matches(predictor, model, x, atol=0.1, rtol=0.05)


def test_docstring_examples() -> None:
    import doctest

    import torchkiln.optimize.artifact as artifact

    result = doctest.testmod(artifact, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
