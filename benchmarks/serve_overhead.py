"""What ``kiln serve`` adds to one request: an identity model, server p50 latency minus a direct call.

The model returns its input (16 float32 values). A real ``kiln serve`` process holds it; one client in
this process sends a request, waits for the answer, sends the next (keep-alive HTTP/1.1 on a plain
socket, so the client's own cost stays in the tens of microseconds). Rounds alternate: ``N`` direct
calls of the same model in-process (under ``inference_mode``), then ``N`` requests to the server.
``overhead_ms`` = p50 of the HTTP round trips - p50 of the direct calls, median over rounds: HTTP
parsing, JSON decode and validation, the batcher's hand-off to its worker thread and back, JSON encode.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from benchmarks._common import figure, log, record, run_benchmark, spread_of
from benchmarks.serve_batching import start_server, stop_server

BENCH = "serve_overhead"
THREADS = (1,)
TARGET = "<= 1.0"


def identity() -> Any:
    """The served model: ``x -> x`` over 16 float32 values."""
    import torch

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor]:
            return (torch.zeros(batch_size, 16),)

    return Identity()


class KeepAliveClient:
    """A minimal blocking HTTP/1.1 client for one keep-alive connection (POST, Content-Length replies)."""

    def __init__(self, url: str) -> None:
        parts = urlparse(url)
        self.host, self.port = parts.hostname, parts.port
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        header, _, rest = self.buffer.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buffer = rest[length:]
        return status, rest[:length]

    def close(self) -> None:
        self.sock.close()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from torchkiln.measure import percentile

    rounds = 3 if args.quick else 8
    per_round_n = 100 if args.quick else 300
    threads = torch.get_num_threads()
    factory = f"{Path(__file__).resolve()}:identity"
    proc, url = start_server(factory, ["--threads", str(threads), "--max-batch-size", "8"])
    model = identity()
    x = torch.rand(16)
    body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    client = KeepAliveClient(url)
    try:
        for _ in range(50):  # warm-up: connection, code paths, allocator
            status, _ = client.post("/v1/predict", body)
            assert status == 200, status
        http_p50, direct_p50, overheads = [], [], []
        for r in range(rounds):
            direct = []
            with torch.inference_mode():
                for _ in range(per_round_n):
                    t0 = time.perf_counter()
                    model(x.unsqueeze(0))
                    direct.append(time.perf_counter() - t0)
            http = []
            for _ in range(per_round_n):
                t0 = time.perf_counter()
                status, payload = client.post("/v1/predict", body)
                http.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"the server answered {status}: {payload[:200]!r}")
            h, d = percentile(http, 50) * 1e3, percentile(direct, 50) * 1e3
            http_p50.append(h)
            direct_p50.append(d)
            overheads.append(h - d)
            log(f"[{BENCH}] round {r + 1}/{rounds}: http p50 {h:.3f} ms, direct p50 {d:.4f} ms")
        http_p99 = percentile(http, 99) * 1e3
        answer = json.loads(payload)["outputs"]["output"]
        assert torch.allclose(torch.tensor(answer), x), "the identity model did not echo its input"
    finally:
        client.close()
        stop_server(proc)
    spread = spread_of(overheads)
    med = spread["median"]
    figures = [
        figure(
            "overhead_ms",
            med,
            TARGET,
            spread=spread,
            unit="ms",
            note="server p50 round trip (keep-alive, one client) minus the direct call's p50",
        ),
        figure("http_p50_ms", spread_of(http_p50)["median"], unit="ms"),
        figure("http_p99_ms_last_round", http_p99, unit="ms"),
        figure("direct_p50_ms", spread_of(direct_p50)["median"], unit="ms"),
    ]
    note = f"overhead {med:.3f} ms per request ({'meets' if med <= 1.0 else 'misses'} 1.0 ms)"
    return record(BENCH, figures, note=note, quick=bool(args.quick), requests_per_round=per_round_n)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__)


if __name__ == "__main__":
    main()
