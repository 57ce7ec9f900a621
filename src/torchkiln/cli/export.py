"""``kiln export MODEL --format F -o PATH``: write a verified inference artifact, print its errors against
eager PyTorch and its size, record the run in the history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

__all__ = ["register"]

_FORMATS = ("torchscript", "export", "aoti", "onnx")


def _model_args(items: list[str]) -> dict[str, Any]:
    from torchkiln.recipe import parse_override

    args: dict[str, Any] = {}
    for text in items:
        try:
            parts, value = parse_override(text)
        except Exception as exc:  # noqa: BLE001 - parse_override raises RecipeError naming --set
            raise typer.BadParameter(str(exc).replace("--set", "--arg"), param_hint="--arg") from None
        if len(parts) != 1:
            raise typer.BadParameter(
                f"{text!r}: model arguments are plain names (hidden=[64])", param_hint="--arg"
            )
        args[parts[0]] = value
    return args


def _example_inputs(target: str, model: Any, batch_size: int) -> tuple[Any, ...]:
    import torch

    from torchkiln.errors import KilnError

    make = getattr(model, "example_inputs", None)
    if callable(make):
        inputs = make(batch_size)
    elif target.endswith(".toml"):
        from torchkiln.cli.bench import bench_inputs_from_recipe
        from torchkiln.recipe import load_recipe
        from torchkiln.train.from_recipe import build_from_recipe

        _, train_data, _, _ = build_from_recipe(load_recipe(target))
        inputs = bench_inputs_from_recipe(train_data, batch_size)
    else:
        raise KilnError(
            f"{target}: the model ({type(model).__name__}) has no example_inputs(batch_size) method, so kiln "
            "export cannot make example inputs; add one, or call tk.export(model, inputs, path) from Python"
        )
    return (inputs,) if isinstance(inputs, torch.Tensor) else inputs


def _label(target: str) -> str:
    """A short run name for a model target: the zoo name, the factory, or the file/directory stem."""
    if "/" in target or target.endswith((".toml", ".pt", ".pth")):
        return Path(target).stem if Path(target).stem != "model" else Path(target).resolve().parent.name
    return target.rpartition(":")[2] or target


def register(app: typer.Typer) -> None:
    """Add ``kiln export`` to ``app``."""

    @app.command("export")
    def export_command(
        target: str = typer.Argument(
            ...,
            help="The model: a zoo name (see `kiln zoo`), pkg.mod:fn, file.py:fn, a recipe .toml, or a "
            "training run directory / its model.pt (the run's recipe.json says which model).",
            show_default=False,
        ),
        fmt: str = typer.Option(
            "torchscript",
            "--format",
            "-f",
            help="torchscript (traced, frozen), export (torch.export .pt2), aoti (AOTInductor package; needs "
            "a C++ compiler), or onnx (run by ONNX Runtime).",
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Artifact path (a directory gets model.<suffix>).", show_default=False
        ),
        weights: Path | None = typer.Option(
            None,
            "--weights",
            "-w",
            help="A state_dict file (model.pt of `kiln train`) to load into the model.",
        ),
        arg: list[str] = typer.Option(
            [], "--arg", "-a", help="Model factory argument, e.g. --arg hidden=[64] (repeatable)."
        ),
        no_fuse: bool = typer.Option(
            False, "--no-fuse", help="Do not fold BatchNorm into the conv/linear before it."
        ),
        batch_size: int = typer.Option(
            2, "--batch-size", "-b", min=1, help="Batch size of the example inputs the model is traced with."
        ),
        static_batch: bool = typer.Option(
            False, "--static-batch", help="Fix the batch dimension at --batch-size (default: dynamic)."
        ),
        opset: int | None = typer.Option(
            None, "--opset", min=7, help="ONNX opset (default: the exporter's)."
        ),
        script: bool = typer.Option(
            False, "--script", help="TorchScript by torch.jit.script instead of tracing."
        ),
        atol: float | None = typer.Option(None, "--atol", min=0.0, help="Absolute tolerance of the check."),
        rtol: float | None = typer.Option(None, "--rtol", min=0.0, help="Relative tolerance of the check."),
        threads: int | None = typer.Option(
            None,
            "--threads",
            "-t",
            min=1,
            help="torch.set_num_threads while exporting (AOTInductor code is generated for it).",
        ),
        record: bool = typer.Option(True, "--record/--no-record", help="Record the run in the history."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Export a model for inference and verify it against eager PyTorch.

        The artifact is loaded back and compared with eager at the example batch size, batch 1 and a larger
        odd batch; a mismatch beyond the tolerance is an error and nothing is written. A sidecar
        <artifact>.kiln.json records the input specs and errors; `kiln serve` and tk.load_predictor read it.
        """
        from rich.console import Console

        from torchkiln.errors import KilnError
        from torchkiln.export import export, resolve_model

        if fmt not in _FORMATS:
            raise typer.BadParameter(
                f"{fmt!r} is not a format; accepted: {', '.join(_FORMATS)}", param_hint="--format"
            )
        if script and fmt != "torchscript":
            raise typer.BadParameter("--script applies to --format torchscript only", param_hint="--script")
        if opset is not None and fmt != "onnx":
            raise typer.BadParameter("--opset applies to --format onnx only", param_hint="--opset")
        console = Console(stderr=json_out)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        model = resolve_model(target, _model_args(arg), weights=weights)
        inputs = _example_inputs(target, model, batch_size)
        if isinstance(inputs, dict):
            raise KilnError(
                f"{target}: the example inputs are a dict ({', '.join(inputs)}); kiln export takes models "
                "whose forward takes tensors positionally"
            )
        console.print(f"[bold]kiln export[/] {target} -> {fmt} ({out})", highlight=False)
        result = export(
            model,
            tuple(inputs),
            out,
            format=fmt,
            dynamic_batch=not static_batch,
            fuse=not no_fuse,
            atol=atol,
            rtol=rtol,
            script=script,
            opset=opset,
            verbose=False,
        )
        run_id = None
        if record:
            from torchkiln.report.history import History

            history = History()
            run_id = history.record(
                "export",
                f"{_label(target)}-{fmt}",
                result.to_dict(),
                config={
                    "target": target,
                    "format": fmt,
                    "out": str(out),
                    "weights": str(weights) if weights else None,
                    "args": list(arg),
                    "fuse": not no_fuse,
                    "batch_size": batch_size,
                    "dynamic_batch": not static_batch,
                    "opset": opset,
                    "script": script,
                    "atol": atol,
                    "rtol": rtol,
                },
                artifacts={"artifact": str(result.path), "sidecar": str(result.sidecar)},
            )
        if json_out:
            typer.echo(json.dumps({"run_id": run_id, "results": result.to_dict()}, default=str))
            return
        _print_result(console, result)
        if run_id:
            console.print(f"recorded run [bold]{run_id}[/]", highlight=False)


def _print_result(console: Any, result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{result.format} vs eager PyTorch", title_justify="left")
    for col in ("batch", "output", "max abs error", "max rel error", "atol", "rtol", "ok"):
        table.add_column(col, justify="left" if col in ("output", "ok") else "right")
    for c in result.checks:
        table.add_row(
            str(c.batch_size),
            c.output,
            f"{c.max_abs:.3g}",
            f"{c.max_rel:.3g}",
            f"{c.atol:g}",
            f"{c.rtol:g}",
            "yes" if c.ok else "NO",
        )
    console.print(table)
    files = ", ".join(str(f) for f in result.files)
    console.print(
        f"artifact: {files} ({result.size_bytes / 1e6:.3g} MB); sidecar {result.sidecar}", highlight=False
    )
    if result.fused:
        console.print(f"folded {len(result.fused)} BatchNorm(s) into the layer before them", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", style="dim", highlight=False)
    console.print(
        f"export {result.export_s:.1f} s, verification {result.verify_s:.1f} s", style="dim", highlight=False
    )
