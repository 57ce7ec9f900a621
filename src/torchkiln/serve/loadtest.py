"""The load tester: async httpx against a ``kiln serve`` endpoint, closed-loop or open-loop.

- closed loop (``concurrency=N``): N clients, each sends its next request when the previous one answers;
- open loop (``rate=R``): requests start at R per second whatever the server does (latency counted from
  each request's scheduled start, so a stalled server cannot hide its queueing: no coordinated
  omission).

Both stop after ``requests`` requests or ``duration_s`` seconds, whichever comes first. Inputs come from
the server's ``/v1/spec`` (random values of the advertised shapes and ranges) or from a file. Results:
throughput, p50/p90/p99 latency, errors by status, and the server's own batching figures from
``/metrics`` when it exposes them.

>>> parse_prometheus("kiln_inferences_total 12.0\\nkiln_executions_total 3.0\\n")["kiln_executions_total"]
3.0
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LoadTestConfig",
    "LoadTestResult",
    "bodies_from_file",
    "bodies_from_spec",
    "loadtest",
    "parse_prometheus",
    "run_loadtest",
]


@dataclass
class LoadTestConfig:
    """What to send, how hard and for how long."""

    url: str
    concurrency: int = 8
    rate: float | None = None  # requests/s: open loop; None: closed loop at `concurrency`
    requests: int | None = None
    duration_s: float = 10.0
    warmup_requests: int = 0
    timeout_s: float = 30.0
    api_key: str | None = None
    input_file: str | None = None
    length: int | None = None  # length of dynamic dimensions in generated inputs (default: their max)
    pool: int = 64  # distinct generated request bodies
    seed: int = 0
    path: str = "/v1/predict"


@dataclass
class LoadTestResult:
    """What a load test measured (latencies of successful requests, in milliseconds)."""

    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    throughput_rps: float
    latency_ms: dict[str, float]
    mode: str
    concurrency: int | None
    rate: float | None
    server: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_prometheus(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition (``name value`` lines) by name."""
    out: dict[str, float] = {}
    for match in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) ([0-9.eE+-]+|NaN|[+-]Inf)$", text, re.M):
        out[match.group(1)] = float(match.group(2))
    return out


def _random_value(spec: dict[str, Any], length: int | None, rng: random.Random) -> Any:
    shape = []
    max_shape = spec.get("max_shape") or [None] * len(spec["shape"])
    for dim, cap in zip(spec["shape"], max_shape, strict=True):
        if dim is not None:
            shape.append(int(dim))
        else:
            limit = int(cap) if cap is not None else 16
            shape.append(min(length, limit) if length else limit)
    dtype = spec["dtype"]
    if dtype.startswith(("float", "bfloat")):
        low, high = spec.get("low", 0.0) or 0.0, spec.get("high", 1.0) or 1.0

        def draw() -> Any:
            return round(rng.uniform(low, high), 6)
    elif dtype == "bool":

        def draw() -> Any:
            return rng.random() < 0.5
    else:
        low = int(spec.get("low") or 0)
        high = int(spec["high"]) if spec.get("high") is not None else low + 2

        def draw() -> Any:
            return rng.randrange(low, high)

    def build(dims: Sequence[int]) -> Any:
        if not dims:
            return draw()
        return [build(dims[1:]) for _ in range(dims[0])]

    return build(shape)


def bodies_from_spec(
    spec: dict[str, Any], n: int = 64, length: int | None = None, seed: int = 0
) -> list[bytes]:
    """``n`` JSON request bodies of random inputs matching a server's ``/v1/spec``."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(n):
        inputs = {s["name"]: _random_value(s, length, rng) for s in spec["inputs"]}
        bodies.append(json.dumps({"inputs": inputs}, separators=(",", ":")).encode())
    return bodies


def bodies_from_file(path: str | Path) -> list[bytes]:
    """Request bodies from a file: one JSON body, a JSON list of bodies, or JSON lines."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path} is empty; give request bodies as JSON or JSON lines")
    try:
        doc = json.loads(text)
    except ValueError:
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        docs = doc if isinstance(doc, list) and doc and isinstance(doc[0], dict) else [doc]
    return [json.dumps(d, separators=(",", ":")).encode() for d in docs]


def _summary(latencies: list[float]) -> dict[str, float]:
    from torchkiln.measure import percentile

    if not latencies:
        return {}
    ms = [x * 1000.0 for x in latencies]
    return {
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms),
        "min": min(ms),
        "max": max(ms),
    }


async def _scrape(client: Any) -> dict[str, float]:
    try:
        response = await client.get("/metrics")
    except Exception:  # noqa: BLE001 - the server may not expose metrics
        return {}
    return parse_prometheus(response.text) if response.status_code == 200 else {}


async def run_loadtest(config: LoadTestConfig) -> LoadTestResult:
    """Run one load test (see the module docstring)."""
    import httpx

    headers = {"content-type": "application/json"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    n_conn = max(1, config.concurrency if config.rate is None else max(config.concurrency, 64))
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    timeout = httpx.Timeout(config.timeout_s, connect=config.timeout_s)
    async with httpx.AsyncClient(
        base_url=config.url.rstrip("/"), headers=headers, limits=limits, timeout=timeout
    ) as client:
        if config.input_file:
            bodies = bodies_from_file(config.input_file)
        else:
            spec_response = await client.get("/v1/spec")
            if spec_response.status_code != 200:
                raise RuntimeError(
                    f"GET {config.url}/v1/spec answered {spec_response.status_code}; give --input-file "
                    "or point at a kiln serve endpoint"
                )
            bodies = bodies_from_spec(spec_response.json(), config.pool, config.length, config.seed)

        latencies: list[float] = []
        statuses: Counter[str] = Counter()

        async def one(i: int, started: float | None = None, record: bool = True) -> None:
            start = time.perf_counter() if started is None else started
            try:
                response = await client.post(config.path, content=bodies[i % len(bodies)])
                status = str(response.status_code)
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if record:
                statuses[status] += 1
                if status == "200":
                    latencies.append(time.perf_counter() - start)

        for i in range(config.warmup_requests):
            await one(i, record=False)
        before = await _scrape(client)

        limit = config.requests
        begin = time.perf_counter()
        deadline = begin + config.duration_s
        sent = 0
        if config.rate is None:

            async def client_loop() -> None:
                nonlocal sent
                while time.perf_counter() < deadline and (limit is None or sent < limit):
                    sent += 1
                    await one(sent)

            await asyncio.gather(*(client_loop() for _ in range(max(1, config.concurrency))))
        else:
            interval = 1.0 / config.rate
            tasks = []
            while limit is None or sent < limit:
                scheduled = begin + sent * interval
                if scheduled >= deadline:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent += 1
                tasks.append(asyncio.ensure_future(one(sent, started=scheduled)))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
        after = await _scrape(client)

    server: dict[str, Any] = {}
    if before and after:
        inf = after.get("kiln_inferences_total", 0) - before.get("kiln_inferences_total", 0)
        exe = after.get("kiln_executions_total", 0) - before.get("kiln_executions_total", 0)
        server = {"inferences": inf, "executions": exe, "mean_batch_size": inf / exe if exe else None}
    ok = statuses.get("200", 0)
    return LoadTestResult(
        requests=sum(statuses.values()),
        ok=ok,
        errors={k: v for k, v in sorted(statuses.items()) if k != "200"},
        duration_s=elapsed,
        throughput_rps=ok / elapsed if elapsed > 0 else 0.0,
        latency_ms=_summary(latencies),
        mode="closed" if config.rate is None else "open",
        concurrency=config.concurrency if config.rate is None else None,
        rate=config.rate,
        server=server,
    )


def loadtest(url: str, **options: Any) -> LoadTestResult:
    """Synchronous :func:`run_loadtest`, e.g. ``loadtest(url, concurrency=32, requests=500)``."""
    return asyncio.run(run_loadtest(LoadTestConfig(url=url, **options)))
