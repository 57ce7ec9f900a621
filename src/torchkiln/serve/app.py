"""The FastAPI app around a :class:`~torchkiln.serve.model.ServedModel` and the dynamic batcher.

Routes: ``POST /v1/predict`` (JSON or ``.npy``/``.npz``; one sample per request), ``GET /v1/spec`` (the
inputs a client sends, what the load tester reads), ``/healthz`` (the process is up), ``/readyz`` (200
only after every batch-size bucket has been warmed up), ``/metrics`` (Prometheus), and FastAPI's
``/docs`` and ``/openapi.json``.

Errors are JSON ``{"error": {"kind", "field", "message"}}``: 400/415/422 for a bad request (naming the
field), 401 without the bearer token, 413 for a body over the limit, 503 with ``Retry-After`` when the
queue is full or the server is warming up or draining, 504 when a request waited past its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from torchkiln import __version__
from torchkiln.serve.batcher import BatcherClosed, DynamicBatcher, QueueFull
from torchkiln.serve.codec import NPY, NPZ, RequestError, decode_request, encode_outputs
from torchkiln.serve.model import ServedModel, bucket_sizes

__all__ = ["ServerConfig", "ServerState", "create_app", "default_threads"]

# Exceptions a model raises because of what one request held (a token id out of range, a shape it
# cannot take): answered 422. Anything else is the server's fault: 500.
_INPUT_ERRORS = (ValueError, IndexError, TypeError, KeyError)


def default_threads() -> int:
    """One core for the event loop, the rest for the model: ``max(1, cores - 1)``."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class ServerConfig:
    """Everything ``kiln serve`` sets besides the model."""

    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 1024
    timeout_s: float = 30.0
    max_body_bytes: int = 8 * 1024 * 1024
    api_key: str | None = None
    threads: int | None = None
    batch_buckets: tuple[int, ...] | None = None  # default: powers of two up to max_batch_size
    pad_batch: bool = False
    warmup_rounds: int = 2
    freeze_gc: bool = True
    switch_interval_s: float | None = None

    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.batch_buckets or bucket_sizes(self.max_batch_size))))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = bool(self.api_key)
        out["batch_buckets"] = list(self.buckets())
        return out


@dataclass
class ServerState:
    """What the routes share: the model, the batcher, readiness and the metrics."""

    served: ServedModel
    config: ServerConfig
    batcher: DynamicBatcher
    metrics: Any
    ready: bool = False
    draining: bool = False
    warmup_s: float | None = None
    warmup_error: str | None = None
    threads: int = 1
    started: float = field(default_factory=time.time)


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps in one process do not collide)."""

    def __init__(self, state_ref: list[ServerState], max_batch_size: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        sizes = sorted({*bucket_sizes(max_batch_size)})
        latency = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.requests = Counter("kiln_requests", "Requests answered, by HTTP status", ["status"], registry=r)
        self.errors = Counter("kiln_errors", "Failed requests by kind of error", ["kind"], registry=r)
        self.inferences = Counter("kiln_inferences", "Requests computed by the model", registry=r)
        self.executions = Counter("kiln_executions", "Model calls (one per batch)", registry=r)
        self.batch_size = Histogram(
            "kiln_batch_size", "Requests per model call", buckets=[float(s) for s in sizes], registry=r
        )
        self.batch_seconds = Histogram(
            "kiln_batch_seconds", "Time of one model call on the worker thread", buckets=latency, registry=r
        )
        self.request_seconds = Histogram(
            "kiln_request_seconds",
            "Time from a request's arrival to its response, inside the server",
            buckets=latency,
            registry=r,
        )
        self.queue_depth = Gauge("kiln_queue_depth", "Requests waiting for a batch", registry=r)
        self.queue_depth.set_function(lambda: state_ref[0].batcher.queue_depth if state_ref else 0)
        self.ready = Gauge("kiln_ready", "1 once warm-up has finished", registry=r)
        self.ready.set_function(lambda: 1.0 if state_ref and state_ref[0].ready else 0.0)

    def on_batch(self, size: int, seconds: float, failed: bool) -> None:
        self.executions.inc()
        self.batch_seconds.observe(seconds)
        if not failed:
            self.inferences.inc(size)
            self.batch_size.observe(size)


def _error(status: int, kind: str, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"kind": kind, "field": field, "message": message}}, status_code=status, headers=headers
    )


_PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "inputs": {
                            "description": "One sample: an object by input name (see /v1/spec), or a list "
                            "(the single input's data, or one entry per input in order)",
                            "oneOf": [{"type": "object"}, {"type": "array"}],
                        }
                    },
                },
                "example": {"inputs": {"x": [[0.0, 1.0]]}},
            },
            NPY: {"schema": {"type": "string", "format": "binary"}},
            NPZ: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {"description": 'JSON {"outputs": {name: nested list}}, or .npy/.npz if Accept asks'},
        "401": {"description": "missing or wrong bearer token"},
        "413": {"description": "body over the size limit"},
        "422": {"description": "an input is malformed; the error names the field"},
        "503": {"description": "queue full, warming up or draining; see Retry-After"},
        "504": {"description": "the request waited past its timeout"},
    },
}


def create_app(
    served: ServedModel,
    config: ServerConfig | None = None,
    on_ready: Callable[[ServerState], None] | None = None,
) -> FastAPI:
    """The app for ``served``.

    Start-up runs the batcher, warms up every bucket on the worker thread, then (with ``freeze_gc``)
    ``gc.freeze()`` -- with torch imported a full collection walks ~190k objects and takes ~80 ms,
    stalling every request in flight -- and calls ``on_ready(state)``. Shutdown drains the queue.
    """
    import sys

    import torch

    config = config or ServerConfig()
    threads = config.threads or served.threads or default_threads()
    state_ref: list[ServerState] = []
    metrics = _Metrics(state_ref, config.max_batch_size)
    served.batch_buckets = config.buckets()
    served.pad_batch = config.pad_batch

    def thread_init() -> None:
        torch.set_num_threads(threads)

    batcher = DynamicBatcher(
        served.run_batch,
        max_batch_size=config.max_batch_size,
        max_delay_ms=config.max_delay_ms,
        max_queue=config.max_queue,
        thread_init=thread_init,
        thread_context=torch.inference_mode,
        on_batch=metrics.on_batch,
    )
    state = ServerState(served=served, config=config, batcher=batcher, metrics=metrics, threads=threads)
    state_ref.append(state)
    specs = served.client_inputs

    async def warm_up() -> None:
        start = time.perf_counter()
        try:
            await batcher.run_on_worker(lambda: served.warmup(served.batch_buckets, config.warmup_rounds))
        except Exception as exc:  # noqa: BLE001 - reported by /readyz, the server stays not ready
            state.warmup_error = f"{type(exc).__name__}: {exc}"
            return
        state.warmup_s = time.perf_counter() - start
        if config.freeze_gc:
            gc.collect()
            gc.freeze()
        state.ready = True
        if on_ready is not None:
            on_ready(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.switch_interval_s is not None:
            sys.setswitchinterval(config.switch_interval_s)
        await batcher.start()
        warm = asyncio.get_running_loop().create_task(warm_up())
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            if not warm.done():
                warm.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warm
            await batcher.drain()

    app = FastAPI(
        title="kiln serve",
        version=__version__,
        description=f"torchkiln model server for {served.name} ({served.format}) with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.kiln = state
    expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    def unauthorized(request: Request) -> JSONResponse | None:
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        metrics.errors.labels("unauthorized").inc()
        metrics.requests.labels("401").inc()
        return _error(
            401,
            "unauthorized",
            "authorization",
            "missing or wrong bearer token; send 'Authorization: Bearer <api key>'",
            {"WWW-Authenticate": "Bearer"},
        )

    def answer_error(exc: RequestError) -> JSONResponse:
        metrics.errors.labels(exc.kind).inc()
        metrics.requests.labels(str(exc.status)).inc()
        return JSONResponse(exc.to_json(), status_code=exc.status)

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(413, "body", f"is {length} bytes; at most {limit} accepted", "too_large")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    413, "body", f"is over {limit} bytes; at most {limit} accepted", "too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/predict", openapi_extra=_PREDICT_DOC, summary="Run the model on one sample")
    async def predict(request: Request) -> Response:
        arrival = time.perf_counter()
        denied = unauthorized(request)
        if denied is not None:
            return denied
        if not state.ready:
            reason = "draining" if state.draining else "warming_up"
            metrics.errors.labels(reason).inc()
            metrics.requests.labels("503").inc()
            return _error(
                503, reason, "server", f"not ready ({reason.replace('_', ' ')})", {"Retry-After": "1"}
            )
        try:
            body = await read_body(request)
            inputs = decode_request(body, request.headers.get("content-type"), specs)
        except RequestError as exc:
            return answer_error(exc)
        try:
            future = batcher.submit_nowait(inputs)
        except QueueFull as exc:
            metrics.errors.labels("overloaded").inc()
            metrics.requests.labels("503").inc()
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            return _error(503, "overloaded", "server", str(exc), {"Retry-After": retry})
        except BatcherClosed as exc:
            metrics.errors.labels("draining").inc()
            metrics.requests.labels("503").inc()
            return _error(503, "draining", "server", str(exc), {"Retry-After": "1"})

        # Drop the request uncomputed if its client goes away while it waits: after the body, the next
        # ASGI message is http.disconnect (when the client closes, or once the response is sent).
        gone = asyncio.ensure_future(request.receive())

        def withdraw(_: Any) -> None:
            future.cancel()

        gone.add_done_callback(withdraw)
        try:
            remaining = config.timeout_s - (time.perf_counter() - arrival)
            outputs = await asyncio.wait_for(future, max(remaining, 0.0))
        except asyncio.TimeoutError:
            metrics.errors.labels("timeout").inc()
            metrics.requests.labels("504").inc()
            return _error(
                504, "timeout", "server", f"no result within the request timeout of {config.timeout_s:g} s"
            )
        except asyncio.CancelledError:
            if gone.done():
                metrics.errors.labels("client_disconnected").inc()
                metrics.requests.labels("499").inc()
                return _error(499, "client_disconnected", "client", "the client went away")
            raise
        except _INPUT_ERRORS as exc:
            metrics.errors.labels("model_error").inc()
            metrics.requests.labels("422").inc()
            return _error(422, "model_error", "inputs", f"the model failed on this input: {exc}")
        except Exception as exc:  # noqa: BLE001
            metrics.errors.labels("inference_failed").inc()
            metrics.requests.labels("500").inc()
            return _error(500, "inference_failed", "model", f"{type(exc).__name__}: {exc}")
        finally:
            if not gone.done():
                gone.remove_done_callback(withdraw)
                gone.cancel()
        payload, media = encode_outputs(outputs, request.headers.get("accept"))
        metrics.requests.labels("200").inc()
        metrics.request_seconds.observe(time.perf_counter() - arrival)
        return Response(payload, media_type=media)

    @app.get("/v1/spec", summary="The inputs a client sends, the outputs, the server's batching settings")
    async def spec(request: Request) -> Response:
        denied = unauthorized(request)
        if denied is not None:
            return denied
        return JSONResponse(
            {**served.spec(), "server": config.to_json(), "threads": threads, "torch": torch.__version__}
        )

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 3)}

    @app.get("/readyz", summary="Readiness: 200 only after every batch-size bucket is warmed up")
    async def readyz() -> Response:
        body = {
            "ready": state.ready,
            "draining": state.draining,
            "warmup_s": state.warmup_s,
            "batch_buckets": list(served.batch_buckets),
        }
        if state.warmup_error:
            body["error"] = state.warmup_error
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus(request: Request) -> Response:
        denied = unauthorized(request)
        if denied is not None:
            return denied
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
