"""Servers for the serve tests: real uvicorn on a loopback port (port 0), on a background thread."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from torchkiln.serve.app import ServerConfig, create_app
from torchkiln.serve.model import ServedModel, TensorSpec, load_served_model
from torchkiln.serve.server import running_server


class SlowDouble:
    """``2 * x`` after sleeping ``delay_s``; raises ValueError on a sample holding 13 (a model error that
    only one request of a batch triggers)."""

    def __init__(self, delay_s: float = 0.0, warmup_delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.warmup_delay_s = warmup_delay_s
        self.calls = 0
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.sizes.append(x.shape[0])
        time.sleep(self.delay_s if self.delay_s else 0.0)
        if (x == 13).any():
            raise ValueError("13 is unlucky")
        return 2 * x


def slow_model(delay_s: float = 0.0) -> ServedModel:
    return ServedModel(SlowDouble(delay_s), [TensorSpec("x", torch.float32, (4,))], name="double")


@pytest.fixture
def serve():
    """``serve(served, **config) -> url`` as a context manager that always shuts the server down."""

    def start(served: ServedModel, wait_ready: bool = True, **config) -> Iterator[str]:
        config.setdefault("threads", 1)
        app = create_app(served, ServerConfig(**config))
        return running_server(app, wait_ready=wait_ready)

    return start


@pytest.fixture(scope="module")
def zoo_servers() -> Iterator[dict]:
    """mlp, resnet-tiny and gpt-tiny behind one server each (batches of up to 8)."""
    import contextlib

    specs = {
        "mlp": {"hidden": (32,)},
        "resnet-tiny": {},
        "gpt-tiny": {"n_layer": 2, "n_embd": 32, "seq_len": 24, "vocab_size": 50},
    }
    with contextlib.ExitStack() as stack:
        out = {}
        for name, args in specs.items():
            torch.manual_seed(0)
            served = load_served_model(name, model_args=args)
            app = create_app(served, ServerConfig(max_batch_size=8, max_delay_ms=20, threads=1))
            url = stack.enter_context(running_server(app))
            out[name] = (url, served, app)
        yield out
