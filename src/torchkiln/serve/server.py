"""Running the app on uvicorn: in the foreground (``kiln serve``, SIGTERM drains and exits 0) or on a
background thread (tests, benchmarks).

SIGTERM or Ctrl-C: uvicorn stops listening and lets every request already accepted finish; the app's
shutdown then drains the batcher's queue; the process exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

__all__ = ["KilnServer", "running_server", "serve_forever", "uvicorn_config"]


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> uvicorn.Config:
    """Uvicorn settings for serving: uvloop and httptools when installed, no access log (it costs more
    per request than a small model), a generous graceful-shutdown window."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": 60,
        "timeout_keep_alive": 30,
        "backlog": 4096,
    }
    options.update(kwargs)
    return uvicorn.Config(app, **options)


class KilnServer(uvicorn.Server):
    """A uvicorn server that reports the address it bound (port 0 picks a free one)."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self.on_listening = on_listening
        self.url: str | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            if ":" in host:
                host = f"[{host}]"
            self.url = f"http://{host}:{port}"
            if self.on_listening is not None:
                self.on_listening(self.url)


def serve_forever(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_listening: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> int:
    """Serve until SIGTERM/SIGINT; drain; return the exit code (0 after a clean drain)."""
    server = KilnServer(uvicorn_config(app, host, port, **kwargs), on_listening=on_listening)
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM handler that
    # would kill the process (exit 143) after a clean drain. Note it instead and exit 0.
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: caught.append(s)) for sig in (signal.SIGTERM,)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        return 1
    return 0


@contextlib.contextmanager
def running_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_timeout_s: float = 120.0,
    wait_ready: bool = True,
    **kwargs: Any,
) -> Iterator[str]:
    """Run ``app`` on a background thread; yield its base URL; stop it (draining) on exit.

    With ``wait_ready`` the URL is yielded only once ``/readyz`` answers 200.
    """
    server = KilnServer(uvicorn_config(app, host, port, **kwargs))
    thread = threading.Thread(target=server.run, name="kiln-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    try:
        while server.url is None:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {ready_timeout_s:g} s")
            time.sleep(0.01)
        if wait_ready:
            import httpx

            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(server.url + "/readyz", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server was not ready within {ready_timeout_s:g} s")
                time.sleep(0.02)
        yield server.url
    finally:
        server.should_exit = True
        thread.join(timeout=90)
        if thread.is_alive():  # pragma: no cover - a hung shutdown
            server.force_exit = True
            thread.join(timeout=10)
        sys.stdout.flush()
