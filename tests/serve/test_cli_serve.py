"""``kiln serve`` as a real process: listening line, readiness, and SIGTERM draining accepted requests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

SLOW_MODEL = '''
import time
import torch


class Slow(torch.nn.Module):
    """2 * x, 0.25 s per call: requests are still queued when SIGTERM arrives."""

    def forward(self, x):
        time.sleep(0.25)
        return 2 * x

    def example_inputs(self, batch_size=2):
        return (torch.zeros(batch_size, 4),)


def make():
    return Slow()
'''


def start_server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    factory = tmp_path / "slow_model.py"
    factory.write_text(SLOW_MODEL)
    cmd = [sys.executable, "-m", "torchkiln.cli.main", "serve", f"{factory}:make", "--port", "0", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    deadline = time.monotonic() + 90
    lines = []
    url = None
    ready = False
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if match:
            url = match.group(1)
        ready = ready or line.startswith("kiln serve: ready")  # may come before the address line
        if ready and url:
            return proc, url
    proc.kill()
    raise AssertionError("the server did not become ready:\n" + "".join(lines))


def test_sigterm_drains_accepted_requests(tmp_path: Path) -> None:
    proc, url = start_server(tmp_path, "--max-batch-size", "4", "--threads", "1")
    try:
        assert httpx.get(url + "/readyz").status_code == 200

        async def load() -> list[int]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                calls = [
                    asyncio.ensure_future(client.post("/v1/predict", json={"inputs": [i, 0, 0, 0]}))
                    for i in range(16)
                ]
                # Wait until the server holds queued work, then ask it to stop.
                deadline = time.monotonic() + 30
                while True:
                    text = (await client.get("/metrics")).text
                    depth = float(re.search(r"^kiln_queue_depth ([0-9.]+)$", text, re.M).group(1))
                    if depth >= 4 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.02)
                assert depth >= 4
                proc.send_signal(signal.SIGTERM)
                responses = await asyncio.gather(*calls)
                assert [r.json()["outputs"]["output"][0] for r in responses] == [2.0 * i for i in range(16)]
                return [r.status_code for r in responses]

        statuses = asyncio.run(load())
        assert statuses == [200] * 16  # every accepted request was answered
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopped after 16 inference(s)" in out
        with pytest.raises(httpx.ConnectError):  # no longer listening
            httpx.get(url + "/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_api_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_API_KEY", "k1")
    proc, url = start_server(tmp_path, "--no-record")
    try:
        body = {"inputs": [1, 2, 3, 4]}
        assert httpx.post(url + "/v1/predict", json=body).status_code == 401
        ok = httpx.post(url + "/v1/predict", json=body, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200 and ok.json()["outputs"]["output"] == [2.0, 4.0, 6.0, 8.0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
