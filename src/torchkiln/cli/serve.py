"""``kiln serve ARTIFACT``: an HTTP model server with dynamic batching (FastAPI on uvicorn)."""

from __future__ import annotations

import json
from typing import Any

import typer

__all__ = ["parse_model_args", "register"]


def parse_model_args(pairs: list[str]) -> dict[str, Any]:
    """``["hidden=[32]", "seq_len=64", "name=x"]`` -> ``{"hidden": [32], "seq_len": 64, "name": "x"}``.

    >>> parse_model_args(["hidden=[32, 16]", "dropout=0.1", "act=gelu"])
    {'hidden': [32, 16], 'dropout': 0.1, 'act': 'gelu'}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--model-arg")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _buckets(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: give batch sizes as 1,2,4,8", param_hint="--batch-buckets"
        ) from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"{text!r}: batch sizes must be >= 1", param_hint="--batch-buckets")
    return sizes


def register(app: typer.Typer) -> None:
    """Add ``kiln serve`` to ``app``."""

    @app.command("serve")
    def serve_command(
        artifact: str = typer.Argument(
            ...,
            help="An exported artifact (kiln export), a zoo model name or user factory (pkg.mod:fn, "
            "file.py:fn), a recipe .toml, or a kiln train model.pt (with --model).",
            show_default=False,
        ),
        model: str | None = typer.Option(None, "--model", help="The zoo model a model.pt state dict is for."),
        model_arg: list[str] = typer.Option(
            [], "--model-arg", "-a", help="Model argument KEY=VALUE (JSON values), repeatable."
        ),
        output: list[str] = typer.Option([], "--output", help="Return only these outputs (repeatable)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
        port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port (0: a free one)."),
        max_batch_size: int = typer.Option(32, "--max-batch-size", "-b", min=1, help="Largest batch."),
        max_delay_ms: float = typer.Option(
            5.0,
            "--max-delay-ms",
            min=0.0,
            help="Longest wait for a batch to fill, from its first request (a request reaching an idle "
            "server runs at once).",
        ),
        max_queue: int = typer.Option(1024, "--max-queue", min=1, help="Queued requests before 503."),
        timeout_s: float = typer.Option(30.0, "--timeout-s", min=0.001, help="Per-request timeout (504)."),
        max_body_mb: float = typer.Option(8.0, "--max-body-mb", min=0.001, help="Request body limit (413)."),
        threads: int | None = typer.Option(
            None, "--threads", "-t", min=1, help="torch.set_num_threads (default: cores - 1)."
        ),
        batch_buckets: str | None = typer.Option(
            None, "--batch-buckets", help="Batch sizes to warm up, e.g. 1,2,4,8 (default: powers of two)."
        ),
        pad_batch: bool = typer.Option(
            False, "--pad-batch", help="Pad each batch up to the next bucket (fixed-batch artifacts)."
        ),
        api_key: str | None = typer.Option(
            None, "--api-key", envvar="KILN_API_KEY", help="Require 'Authorization: Bearer KEY'."
        ),
        record: bool = typer.Option(True, "--record/--no-record", help="Record the session in the history."),
    ) -> None:
        """Serve a model over HTTP with dynamic batching: POST /v1/predict, /v1/spec, /healthz, /readyz,
        /metrics (Prometheus), /docs.

        Requests are grouped up to --max-batch-size; every batch-size bucket is warmed up before /readyz
        turns 200. SIGTERM stops accepting, finishes every accepted request and exits 0.
        """
        import sys

        from torchkiln.serve.app import ServerConfig, create_app
        from torchkiln.serve.model import load_served_model
        from torchkiln.serve.server import serve_forever

        served = load_served_model(
            artifact, model=model, model_args=parse_model_args(model_arg), outputs=output or None
        )
        config = ServerConfig(
            max_batch_size=max_batch_size,
            max_delay_ms=max_delay_ms,
            max_queue=max_queue,
            timeout_s=timeout_s,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            api_key=api_key or None,
            threads=threads,
            batch_buckets=_buckets(batch_buckets),
            pad_batch=pad_batch,
        )

        def on_ready(state: Any) -> None:
            typer.echo(
                f"kiln serve: ready (warm-up of batch sizes {list(state.served.batch_buckets)} took "
                f"{state.warmup_s:.2f} s)"
            )
            sys.stdout.flush()

        app_ = create_app(served, config, on_ready=on_ready)
        state = app_.state.kiln

        def on_listening(url: str) -> None:
            inputs = ", ".join(
                f"{s.name}{list(s.shape)}:{str(s.dtype).removeprefix('torch.')}" for s in served.client_inputs
            )
            typer.echo(
                f"kiln serve: {served.name} ({served.format}; inputs {inputs}) on {url} "
                f"(max batch {max_batch_size}, max delay {max_delay_ms:g} ms, {state.threads} thread(s)"
                f"{', bearer token required' if api_key else ''}); POST {url}/v1/predict, docs {url}/docs"
            )
            sys.stdout.flush()

        code = serve_forever(app_, host, port, on_listening=on_listening)
        stats = state.batcher.stats
        typer.echo(
            f"kiln serve: stopped after {stats.inferences} inference(s) in {stats.executions} model call(s)"
        )
        if record and stats.executions:
            from torchkiln.report.history import History

            sizes = dict(sorted(stats.batch_sizes.items()))
            results = {
                "inferences": stats.inferences,
                "executions": stats.executions,
                "mean_batch_size": stats.inferences / max(1, stats.executions),
                "batch_sizes": {str(k): v for k, v in sizes.items()},
                "dropped": stats.dropped,
                "failed": stats.failed,
                "warmup_s": state.warmup_s,
            }
            run_config = {"artifact": artifact, "model": model, **config.to_json(), "threads": state.threads}
            try:
                run_id = History().record("serve", served.name, results, config=run_config)
                typer.echo(f"recorded run {run_id}")
            except Exception as exc:  # noqa: BLE001 - a history problem must not turn a clean drain into a failure
                typer.echo(f"could not record the run: {exc}", err=True)
        raise typer.Exit(code)
