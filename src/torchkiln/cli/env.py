"""``kiln env``: versions, CPU/GPU features and the measured GEMM peak (for bug reports and benchmarks)."""

from __future__ import annotations

import json
from typing import Any

import typer


def _format_flops(value: float) -> str:
    if value >= 1e12:
        return f"{value / 1e12:.2f} TFLOP/s"
    return f"{value / 1e9:.1f} GFLOP/s"


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _yes_no(value: Any) -> str:
    if value is None:
        return "[dim]unknown[/]"
    return "[green]yes[/]" if value else "[dim]no[/]"


def _print_env(env: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()

    versions = Table(title="Software", show_header=False, title_justify="left")
    versions.add_column("", style="bold")
    versions.add_column("")
    versions.add_row("python", env["python"])
    plat = env["platform"]
    versions.add_row("platform", f"{plat['system']} {plat['release']} ({plat['machine']})")
    versions.add_row("torch", env["torch"]["version"])
    for name, version in env["packages"].items():
        versions.add_row(name, version or "[dim]not installed[/]")
    versions.add_row("git commit", env["git_commit"] or "[dim]none[/]")
    console.print(versions)

    cpu = env["cpu"]
    cpu_table = Table(title="CPU", show_header=False, title_justify="left")
    cpu_table.add_column("", style="bold")
    cpu_table.add_column("")
    cpu_table.add_row("model", cpu["model"])
    cpu_table.add_row("cores", f"{cpu['physical_cores']} physical, {cpu['logical_cores']} logical")
    cpu_table.add_row("torch threads", f"{cpu['torch_threads']} (interop {cpu['torch_interop_threads']})")
    if cpu["thread_env"]:
        cpu_table.add_row("thread env", ", ".join(f"{k}={v}" for k, v in cpu["thread_env"].items()))
    cpu_table.add_row("capability", str(cpu["capability"]))
    for flag, present in cpu["flags"].items():
        cpu_table.add_row(flag, _yes_no(present))
    cpu_table.add_row("mkldnn", _yes_no(cpu["mkldnn"]))
    cpu_table.add_row("mkldnn bf16", _yes_no(cpu["mkldnn_bf16"]))
    cpu_table.add_row("mkldnn fp16", _yes_no(cpu["mkldnn_fp16"]))
    console.print(cpu_table)

    cuda = env["cuda"]
    gpu_table = Table(title="CUDA", show_header=False, title_justify="left")
    gpu_table.add_column("", style="bold")
    gpu_table.add_column("")
    gpu_table.add_row("available", _yes_no(cuda["available"]))
    if cuda["available"]:
        gpu_table.add_row("CUDA / cuDNN", f"{cuda['cuda_version']} / {cuda['cudnn_version']}")
        gpu_table.add_row("bf16", _yes_no(cuda["bf16_supported"]))
        for dev in cuda["devices"]:
            gpu_table.add_row(
                f"cuda:{dev['index']}",
                f"{dev['name']} (sm {dev['capability']}, {_format_bytes(dev['total_memory_bytes'])})",
            )
    console.print(gpu_table)

    if "peak_flops" in env:
        source = env["peak_flops_source"]
        title = f"Measured GEMM peak ({source['device']}, {source['threads']} threads)"
        peak = Table(title=title, title_justify="left")
        peak.add_column("dtype", style="bold")
        peak.add_column("peak", justify="right")
        peak.add_column("")
        for dtype, value in env["peak_flops"].items():
            note = "(cached)" if source["cached"].get(dtype) else "(measured now)"
            peak.add_row(dtype, _format_flops(value), f"[dim]{note}[/]")
        console.print(peak)
        console.print("[dim]re-measure with --refresh; skip with --no-peak[/]")


def env_command(
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON dump on stdout."),
    no_peak: bool = typer.Option(False, "--no-peak", help="Do not measure (or read) the GEMM peak."),
    refresh: bool = typer.Option(
        False,
        "--refresh",
        help="Measure the GEMM peak again (the cache keeps the best measurement: load only lowers it).",
    ),
) -> None:
    """Show versions, CPU/GPU features and this machine's measured GEMM peak (FLOP/s per dtype)."""
    from torchkiln.measure import collect_env

    if no_peak or as_json:
        env = collect_env(measure_peak=not no_peak, refresh_peak=refresh)
    else:
        from rich.console import Console

        status = "Collecting the environment (measuring the GEMM peak takes a few seconds, once)"
        with Console(stderr=True).status(status):
            env = collect_env(measure_peak=True, refresh_peak=refresh)
    if as_json:
        typer.echo(json.dumps(env, indent=2, sort_keys=True, default=str))
    else:
        _print_env(env)


def register(app: typer.Typer) -> None:
    """Add ``kiln env`` to ``app``."""
    app.command("env")(env_command)
