"""``kiln loadtest URL``: throughput and latency percentiles of a model server under load."""

from __future__ import annotations

import json

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``kiln loadtest`` to ``app``."""

    @app.command("loadtest")
    def loadtest_command(
        url: str = typer.Argument(..., help="Base URL of a kiln serve endpoint, e.g. http://127.0.0.1:8000"),
        concurrency: int = typer.Option(
            8, "--concurrency", "-c", min=1, help="Closed loop: clients, each waiting for its last answer."
        ),
        rate: float | None = typer.Option(
            None, "--rate", "-r", min=0.001, help="Open loop: requests started per second (overrides -c)."
        ),
        requests: int | None = typer.Option(None, "--requests", "-n", min=1, help="Stop after this many."),
        duration_s: float = typer.Option(10.0, "--duration-s", "-d", min=0.01, help="Stop after this long."),
        warmup: int = typer.Option(8, "--warmup", min=0, help="Untimed requests first."),
        input_file: str | None = typer.Option(
            None,
            "--input-file",
            help="Request bodies (JSON, a JSON list or JSON lines); default: random "
            "inputs from the server's /v1/spec.",
        ),
        length: int | None = typer.Option(
            None, "--length", min=1, help="Length of dynamic dimensions in generated inputs (default: max)."
        ),
        timeout_s: float = typer.Option(30.0, "--timeout-s", min=0.001, help="Client timeout per request."),
        api_key: str | None = typer.Option(None, "--api-key", envvar="KILN_API_KEY", help="Bearer token."),
        json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
        record: bool = typer.Option(True, "--record/--no-record", help="Record the run in the history."),
        name: str | None = typer.Option(None, "--name", help="Name of the recorded run (default: the URL)."),
    ) -> None:
        """Load-test a server: closed loop at --concurrency or open loop at --rate, bounded by --requests
        and --duration-s; prints throughput, p50/p90/p99 latency and errors by status."""
        import asyncio

        from torchkiln.serve.loadtest import LoadTestConfig, run_loadtest

        config = LoadTestConfig(
            url=url,
            concurrency=concurrency,
            rate=rate,
            requests=requests,
            duration_s=duration_s,
            warmup_requests=warmup,
            timeout_s=timeout_s,
            api_key=api_key or None,
            input_file=input_file,
            length=length,
        )
        result = asyncio.run(run_loadtest(config)).to_json()
        run_id = None
        if record:
            from torchkiln.report.history import History

            run_config = {k: v for k, v in vars(config).items() if k != "api_key"}
            run_id = History().record("loadtest", name or url, result, config=run_config)
        if json_out:
            typer.echo(json.dumps({"run_id": run_id, "results": result}))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        mode = f"closed loop, {concurrency} clients" if rate is None else f"open loop, {rate:g} req/s"
        table = Table(title=f"kiln loadtest {url} ({mode})", title_justify="left", show_header=False)
        table.add_column("figure")
        table.add_column("value", justify="right")
        table.add_row("requests (ok)", f"{result['requests']} ({result['ok']})")
        table.add_row("duration", f"{result['duration_s']:.2f} s")
        table.add_row("throughput", f"{result['throughput_rps']:,.1f} req/s")
        lat = result["latency_ms"]
        for key in ("p50", "p90", "p99", "max"):
            if key in lat:
                table.add_row(f"latency {key}", f"{lat[key]:.2f} ms")
        for status, count in result["errors"].items():
            table.add_row(f"errors {status}", str(count))
        if result["server"].get("mean_batch_size"):
            table.add_row("server mean batch size", f"{result['server']['mean_batch_size']:.2f}")
        console.print(table)
        if run_id:
            console.print(f"recorded run [bold]{run_id}[/]", highlight=False)
