"""The HTTP server end to end on loopback: batching, validation, errors, metrics, readiness, auth."""

from __future__ import annotations

import asyncio
import io
import re

import httpx
import numpy as np
import pytest
import torch

from tests.serve.conftest import SlowDouble, slow_model
from torchkiln.serve.model import ServedModel, TensorSpec


def metric(url: str, name: str, headers: dict | None = None) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def post_all(url: str, bodies: list, **kwargs) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=b, **kwargs) for b in bodies))


def test_concurrent_clients_see_batches_form(zoo_servers) -> None:
    url, served, _ = zoo_servers["mlp"]
    xs = torch.rand(64, 64)
    before_inf = metric(url, "kiln_inferences_total")
    before_exe = metric(url, "kiln_executions_total")
    responses = asyncio.run(post_all(url, [{"inputs": {"x": x.tolist()}} for x in xs]))
    assert [r.status_code for r in responses] == [200] * 64
    got = torch.tensor([r.json()["outputs"]["output"] for r in responses])
    with torch.inference_mode():
        want = served.fn(xs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    inferences = metric(url, "kiln_inferences_total") - before_inf
    executions = metric(url, "kiln_executions_total") - before_exe
    assert inferences == 64
    assert executions < inferences  # requests shared model calls
    text = httpx.get(url + "/metrics").text
    for name in ("kiln_queue_depth", "kiln_batch_size_bucket", "kiln_request_seconds_bucket", "kiln_errors"):
        assert name in text


def test_variable_length_transformer_padded_with_a_mask(zoo_servers) -> None:
    url, served, _ = zoo_servers["gpt-tiny"]
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (n,)) for n in (3, 24, 7, 1, 16, 11, 5, 20, 9, 2)]
    responses = asyncio.run(post_all(url, [{"inputs": {"idx": s.tolist()}} for s in seqs]))
    assert [r.status_code for r in responses] == [200] * len(seqs)
    model = served.fn
    with torch.inference_mode():
        for seq, r in zip(seqs, responses, strict=True):
            got = torch.tensor(r.json()["outputs"]["output"])
            want = model(seq[None])[0]
            assert got.shape == (len(seq), 50)  # padding cut off
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cnn_with_binary_npy_bodies(zoo_servers) -> None:
    url, served, _ = zoo_servers["resnet-tiny"]
    xs = torch.rand(12, 1, 8, 8)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            calls = []
            for x in xs:
                buf = io.BytesIO()
                np.save(buf, x.numpy())
                calls.append(
                    client.post(
                        "/v1/predict",
                        content=buf.getvalue(),
                        headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
                    )
                )
            return await asyncio.gather(*calls)

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    assert responses[0].headers["content-type"].startswith("application/x-npy")
    got = torch.stack([torch.from_numpy(np.load(io.BytesIO(r.content))) for r in responses])
    with torch.inference_mode():
        want = served.fn(xs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_one_malformed_request_fails_alone(zoo_servers) -> None:
    url, _, _ = zoo_servers["gpt-tiny"]
    good = [{"inputs": {"idx": [1, 2, 3, i]}} for i in range(8)]
    bad = [
        {"inputs": {"idx": [1, 2, 99]}},  # token id past the vocabulary
        {"inputs": {"idx": [[1, 2], [3]]}},  # ragged
        {"inputs": {"idx": [1.5, 2.0]}},  # floats for token ids
        {"inputs": {"ids": [1, 2]}},  # wrong name
        {"inputs": {"idx": list(range(30))}},  # longer than seq_len 24
        {"nothing": 1},
    ]
    bodies = good[:4] + bad + good[4:]
    responses = asyncio.run(post_all(url, bodies))
    statuses = [r.status_code for r in responses]
    assert statuses[:4] == [200] * 4 and statuses[-4:] == [200] * 4
    errors = [r.json()["error"] for r in responses[4:-4]]
    assert all(400 <= r.status_code < 500 for r in responses[4:-4])
    fields = [e["field"] for e in errors]
    assert fields == ["inputs.idx", "inputs.idx", "inputs.idx", "inputs.ids", "inputs.idx", "inputs"]
    assert "< 50" in errors[0]["message"] and "at most 24" in errors[4]["message"]
    bad_json = httpx.post(
        url + "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["field"] == "body"


def test_a_batch_that_fails_is_retried_one_by_one(serve) -> None:
    served = slow_model(0.05)
    with serve(served, max_batch_size=8, max_delay_ms=50) as url:
        bodies = [{"inputs": {"x": [i, 0, 0, 0]}} for i in range(10)] + [{"inputs": {"x": [13, 0, 0, 0]}}]
        bodies += [{"inputs": {"x": [i, 1, 1, 1]}} for i in range(10)]
        responses = asyncio.run(post_all(url, bodies))
        statuses = [r.status_code for r in responses]
        assert statuses[10] == 422
        assert responses[10].json()["error"]["kind"] == "model_error"
        assert "unlucky" in responses[10].json()["error"]["message"]
        assert statuses[:10] == [200] * 10 and statuses[11:] == [200] * 10
        assert responses[3].json()["outputs"]["output"] == [6.0, 0.0, 0.0, 0.0]
        assert 'kiln_errors_total{kind="model_error"} 1.0' in httpx.get(url + "/metrics").text


def test_overload_answers_503_with_retry_after(serve) -> None:
    with serve(slow_model(0.3), max_batch_size=1, max_queue=2) as url:
        responses = asyncio.run(post_all(url, [{"inputs": [0, 0, 0, i]} for i in range(10)]))
        statuses = [r.status_code for r in responses]
        assert 503 in statuses and 200 in statuses
        rejected = [r for r in responses if r.status_code == 503]
        assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
        assert rejected[0].json()["error"]["kind"] == "overloaded"


def test_request_timeout_answers_504(serve) -> None:
    with serve(slow_model(0.6), max_batch_size=1, timeout_s=0.25) as url:
        responses = asyncio.run(post_all(url, [{"inputs": [1, 2, 3, 4]}] * 3))
        statuses = sorted(r.status_code for r in responses)
        assert 504 in statuses
        timed_out = next(r for r in responses if r.status_code == 504)
        assert timed_out.json()["error"]["kind"] == "timeout"


def test_a_request_whose_client_left_is_not_computed(serve) -> None:
    fn = SlowDouble(0.5)
    served = ServedModel(fn, [TensorSpec("x", torch.float32, (4,))])
    with serve(served, max_batch_size=1) as url:
        calls_before = fn.calls

        async def go() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                busy = asyncio.ensure_future(client.post("/v1/predict", json={"inputs": [0, 0, 0, 0]}))
                await asyncio.sleep(0.1)  # the worker is busy with `busy`
                async with httpx.AsyncClient(base_url=url, timeout=0.15) as impatient:
                    with pytest.raises(httpx.TimeoutException):
                        await impatient.post("/v1/predict", json={"inputs": [1, 1, 1, 1]})
                assert (await busy).status_code == 200

        asyncio.run(go())
        text = httpx.get(url + "/metrics").text
        assert 'kiln_errors_total{kind="client_disconnected"} 1.0' in text
        assert fn.calls - calls_before == 1  # only the request whose client stayed


def test_bearer_token(serve) -> None:
    with serve(slow_model(), api_key="s3cret") as url:
        body = {"inputs": [1, 2, 3, 4]}
        assert httpx.post(url + "/v1/predict", json=body).status_code == 401
        wrong = httpx.post(url + "/v1/predict", json=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["error"]["field"] == "authorization"
        ok = httpx.post(url + "/v1/predict", json=body, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/healthz").status_code == 200  # probes stay open


def test_oversized_body_answers_413(serve) -> None:
    with serve(slow_model(), max_body_bytes=1000) as url:
        big = {"inputs": [1.0, 2.0, 3.0, 4.0], "padding": "x" * 5000}
        r = httpx.post(url + "/v1/predict", json=big)
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"

        def chunks():  # no content-length: the limit applies while streaming
            for _ in range(10):
                yield b" " * 500

        r = httpx.post(url + "/v1/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_ready_only_after_warmup(serve) -> None:
    import time

    class SlowWarmup(ServedModel):
        def warmup(self, batch_sizes=None, rounds=2):
            time.sleep(1.0)
            return super().warmup(batch_sizes, rounds)

    served = SlowWarmup(SlowDouble(), [TensorSpec("x", torch.float32, (4,))])
    with serve(served, wait_ready=False, max_batch_size=4) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        first = httpx.get(url + "/readyz")
        assert first.status_code == 503 and first.json()["ready"] is False
        early = httpx.post(url + "/v1/predict", json={"inputs": [1, 2, 3, 4]})
        assert early.status_code == 503 and "retry-after" in early.headers
        deadline = time.monotonic() + 60
        while httpx.get(url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert served.fn.sizes[:4] == [1, 1, 2, 2]  # every bucket warmed up (1, 2, 4; two rounds each)
        assert 4 in served.fn.sizes
        assert httpx.post(url + "/v1/predict", json={"inputs": [1, 2, 3, 4]}).status_code == 200


def test_spec_and_openapi(zoo_servers) -> None:
    url, _, _ = zoo_servers["gpt-tiny"]
    spec = httpx.get(url + "/v1/spec").json()
    assert spec["inputs"] == [
        {"name": "idx", "dtype": "int64", "shape": [None], "max_shape": [24], "low": 0, "high": 50}
    ]
    assert spec["model_inputs"] == ["idx", "attention_mask"]
    assert spec["server"]["max_batch_size"] == 8
    openapi = httpx.get(url + "/openapi.json").json()
    assert "/v1/predict" in openapi["paths"]
    assert httpx.get(url + "/docs").status_code == 200


def test_serves_an_exported_artifact(serve, tmp_path) -> None:
    export = pytest.importorskip("torchkiln.export")
    import torchkiln as tk
    from torchkiln.serve.model import load_served_model

    torch.manual_seed(0)
    model = tk.create_model("mlp", hidden=(16,)).eval()
    path = tmp_path / "mlp.pt"
    export.export(model, model.example_inputs(4), str(path), format="torchscript", verbose=False)
    served = load_served_model(str(path))
    assert served.format == "torchscript"
    x = torch.rand(6, 64)
    with serve(served, max_batch_size=4) as url:
        responses = asyncio.run(post_all(url, [{"inputs": row.tolist()} for row in x]))
    got = torch.tensor([next(iter(r.json()["outputs"].values())) for r in responses])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)
