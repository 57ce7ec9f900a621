"""``kiln quantize MODEL``: int8 quantization (dynamic, static, weight-only, QAT), the int8 artifact written,
the before/after table printed and recorded in the history (kind ``compress``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

__all__ = ["METHODS", "register"]

METHODS = ("dynamic", "static", "weight-only", "qat")
BACKENDS = ("torchao", "eager", "onnxruntime")


def _accuracy_fn(val_data: Any, batch_size: int) -> Any:
    """Accuracy (argmax of the output against the target; token level for sequence targets) on val data."""
    if val_data is None:
        return None
    import torch
    from torch.utils.data import DataLoader

    from torchkiln.compress.compare import _main_tensor
    from torchkiln.compress.quantize import model_inputs

    loader = val_data if isinstance(val_data, DataLoader) else DataLoader(val_data, batch_size=batch_size)

    def accuracy(model: Any) -> float:
        correct = total = 0
        with torch.inference_mode():
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    return float("nan")
                inputs, target = model_inputs(batch), batch[-1]
                n = target.shape[0]
                if n < batch_size:  # compiled graphs and sessions keep one batch size: pad the last batch
                    inputs = tuple(torch.cat([t, t[:1].expand(batch_size - n, *t.shape[1:])]) for t in inputs)
                pred = _main_tensor(model(*inputs))[:n].argmax(-1)
                if pred.shape != target.shape:
                    return float("nan")
                keep = target != -100
                correct += int((pred[keep] == target[keep]).sum())
                total += int(keep.sum())
        return correct / total if total else float("nan")

    return accuracy


def _config(method: str, **o: Any) -> Any:
    from torchkiln.compress.quantize import Int4WeightOnly, Int8Dynamic, Int8QAT, Int8Static, Int8WeightOnly

    select = {
        "include": tuple(o["include"]),
        "exclude": tuple(o["exclude"]),
        "keep_first_last": o["first_last"],
    }
    if method == "dynamic":
        return Int8Dynamic(backend=o["backend"], granularity=o["granularity"], threads=o["threads"], **select)
    if method == "static":
        return Int8Static(
            calibration=o["calibration"],
            num_batches=o["calibration_batches"],
            observer=o["observer"],
            **select,
        )
    if method == "weight-only":
        return (
            Int4WeightOnly(group_size=o["group_size"], **select)
            if o["bits"] == 4
            else Int8WeightOnly(**select)
        )
    return Int8QAT(step="prepare", **select)


def register(app: typer.Typer) -> None:
    """Add ``kiln quantize`` to ``app``."""

    @app.command("quantize")
    def quantize_command(
        target: str = typer.Argument(
            ...,
            help="A zoo model name, pkg.mod:fn or file.py:fn, a recipe .toml, a `kiln train` run (its "
            "directory or model.pt) or a pruned .pt from `kiln prune`; recipes and runs (and pruned files "
            "made from them) bring their data for calibration, QAT and accuracy.",
            show_default=False,
        ),
        method: str = typer.Option(
            "dynamic",
            "--method",
            "-m",
            help="dynamic: int8 weights, activations quantized at run time (Linear-heavy models: "
            "transformers, MLPs); static: PT2E int8 calibrated on data, convs and Linear (CNNs); "
            "weight-only: int8 weights, float activations (small batch); qat: quantization-aware "
            "training with the recipe's data, then int8.",
        ),
        backend: str = typer.Option(
            "torchao",
            "--backend",
            help="dynamic: torchao (run under torch.compile), eager (torch.ao quantize_dynamic), or "
            "onnxruntime (ONNX export + ORT int8 session).",
        ),
        granularity: str = typer.Option(
            "per_token", "--granularity", help="dynamic/torchao activation scales: per_token or per_tensor."
        ),
        include: list[str] = typer.Option(
            [], "--include", help="Quantize only layers matching this name pattern (repeatable), 'blocks.*'."
        ),
        exclude: list[str] = typer.Option(
            [], "--exclude", help="Keep layers matching this name pattern in float (repeatable)."
        ),
        first_last: bool = typer.Option(
            True,
            "--keep-first-last/--quantize-first-last",
            help="Keep the stem conv and the last Linear (classifier / LM head) in float.",
        ),
        calibration_batches: int = typer.Option(
            16, "--calibration-batches", min=1, help="static: batches of training data to calibrate on."
        ),
        observer: str = typer.Option(
            "histogram", "--observer", help="static: histogram, minmax or moving_average."
        ),
        bits: int = typer.Option(8, "--bits", help="weight-only: 8 (torchao int8) or 4 (groupwise int4)."),
        group_size: int = typer.Option(32, "--group-size", help="weight-only --bits 4: inputs per scale."),
        qat_steps: int = typer.Option(
            100, "--qat-steps", min=1, help="qat: training steps on the recipe's data."
        ),
        weights: Path | None = typer.Option(
            None, "--weights", "-w", help="Trained weights (model.pt or a checkpoint) to load first."
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            "-o",
            help="Artifact path (default runs/quantize/<name>-<method>[-<backend>].<ext>).",
        ),
        batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Batch of the comparison."),
        threads: int = typer.Option(1, "--threads", "-t", min=1, help="Threads while timing (and ORT's)."),
        mode: str = typer.Option(
            "auto",
            "--mode",
            help="Execution mode of the comparison, the same for both models: auto (how the quantized "
            "model is meant to run), eager or compile.",
        ),
        max_time_s: float = typer.Option(
            5.0, "--max-time-s", min=0.1, help="Time budget of the latency rounds."
        ),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Recipe override, e.g. --set data.batch_size=64."
        ),
        record: bool = typer.Option(True, "--record/--no-record", help="Record the run in the history."),
    ) -> None:
        """Quantize a model to int8 and measure what it bought.

        Before/after table: artifact size, latency, output agreement, accuracy.
        Both models run the same way (compiled vs compiled with freezing, or
        eager vs eager; ONNX Runtime against eager PyTorch), timed interleaved
        in one process with fixed threads. The artifact is the int8 file itself
        (.pt2 static, .onnx onnxruntime, int8 state_dict otherwise), so its
        size is the real size.

        kiln quantize recipes/resnet_digits.toml --method static

        kiln quantize gpt-tiny --backend onnxruntime --exclude 'blocks.0.*'
        """
        import tempfile

        import torch
        from rich.console import Console

        from torchkiln.compress.api import quantize
        from torchkiln.compress.compare import compare_models
        from torchkiln.compress.quantize import (
            DYNAMIC_BACKENDS,
            GRANULARITIES,
            OBSERVERS,
            Int8QAT,
            quant_info,
            run_like,
            save_quantized,
        )
        from torchkiln.errors import KilnError

        console = Console()
        for value, option, accepted in (
            (method, "--method", METHODS),
            (backend, "--backend", DYNAMIC_BACKENDS),
            (granularity, "--granularity", GRANULARITIES),
            (observer, "--observer", OBSERVERS),
            (mode, "--mode", ("auto", "eager", "compile")),
        ):
            if value not in accepted:
                raise KilnError(f"{option} {value!r} is unknown; accepted: {', '.join(accepted)}")
        if bits not in (4, 8) or (bits == 4 and method != "weight-only"):
            raise KilnError(f"--bits {bits}: accepted: 8, or 4 with --method weight-only")
        if backend != "torchao" and method != "dynamic":
            raise KilnError(f"--backend {backend} applies to --method dynamic only (got --method {method})")
        from torchkiln.targets import NAMED_KINDS, resolve_target

        resolved = resolve_target(
            target, weights=weights, overrides=set_, accept=NAMED_KINDS, command="kiln quantize"
        )
        before = resolved.model
        inputs = resolved.example_inputs(batch_size)
        calibration = None
        if method in ("static", "qat"):
            if resolved.train_data is None:
                purpose = "calibration" if method == "static" else "training"
                raise KilnError(
                    f"--method {method} needs representative data ({purpose}): {target} brings none; give a "
                    "recipe (.toml), a training run, or a pruned artifact made from one"
                )
            from torch.utils.data import DataLoader

            calibration = DataLoader(
                resolved.train_data,
                batch_size=batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
            )
        config = _config(
            method,
            backend=backend,
            granularity=granularity,
            threads=threads,
            include=include,
            exclude=exclude,
            first_last=first_last,
            calibration=calibration,
            calibration_batches=calibration_batches,
            observer=observer,
            bits=bits,
            group_size=group_size,
        )
        suffix = {"static": ".pt2"}.get(method, ".onnx" if backend == "onnxruntime" else ".pt")
        stem = f"{resolved.name}-{method}" + (f"-{backend}" if method == "dynamic" else "")
        stem += f"-int{bits}" if method == "weight-only" else ""
        out_path = out or Path("runs") / "quantize" / f"{stem}{suffix}"
        console.print(
            f"[bold]kiln quantize[/] {target}: {method}"
            + (f" ({backend})" if method == "dynamic" else "")
            + f" -> {out_path}",
            highlight=False,
        )
        with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as tmp:
            if method == "qat":
                import torchkiln as tk

                prepared = quantize(before, config)
                tk.fit(
                    prepared,
                    resolved.train_data,
                    max_steps=qat_steps,
                    epochs=1000,
                    progress="off",
                    flops=False,
                )
                after = quantize(prepared, Int8QAT(step="convert"))
            else:
                after = quantize(before, config, example_inputs=inputs, workdir=tmp)
            save_quantized(after, out_path)
            before_path = Path(tmp) / "before.pt"
            torch.save(before.state_dict(), before_path)
            run_mode = None if mode == "auto" else mode
            run_before, run_after = run_like(after, before, mode=run_mode)
            info = quant_info(after)
            compiled = run_after is not after and info.get("backend") != "onnxruntime"
            report = compare_models(
                before,
                after,
                inputs,
                eval_fn=_accuracy_fn(resolved.val_data, batch_size),
                artifacts={"before": before_path, "after": out_path},
                mode="compile" if compiled else "eager",
                run_before=run_before,
                run_after=run_after,
                threads=threads,
                max_time_s=max_time_s,
                name=resolved.name,
                technique=info.get("technique", method)
                + (f" ({info['backend']})" if info.get("backend") else ""),
                flops=False,
            )
        if info.get("backend") == "onnxruntime":
            report.notes.append(
                f"after runs in ONNX Runtime ({threads} intra-op thread(s)); before in eager PyTorch"
            )
        report.notes.append(f"{len(info.get('layers', []))} layers quantized; artifact {out_path}")
        report.notes.append("FLOPs are not counted: quantization does the same multiply-adds, in int8")
        console.print(report.table())
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
        if record:
            from torchkiln.report.history import History

            cfg = {
                **resolved.source,
                "method": method,
                "backend": backend if method == "dynamic" else info.get("backend"),
                "include": list(include),
                "exclude": list(exclude),
                "keep_first_last": first_last,
                "batch_size": batch_size,
                "threads": threads,
                "mode": report.mode,
            }
            extra = {"technique": info.get("technique"), "layers": info.get("layers", [])}
            run_id = History().record(
                "compress",
                resolved.name,
                report.history_results(extra),
                config=cfg,
                artifacts={"quantized": str(out_path)},
            )
            console.print(f"recorded run [bold]{run_id}[/] (kiln history)", highlight=False)
