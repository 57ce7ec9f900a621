"""``kiln profile`` and ``kiln memory``: profile a zoo model or a recipe's model on a real batch, print
the tables, write the results and the trace, and record the run in the history.

A target is a zoo model name (``mlp``, ``resnet-tiny``, ``gpt-tiny``, or ``pkg.mod:fn``) or a recipe file
(``*.toml``). For a zoo model the inputs are ``model.example_inputs(batch_size)`` and, in train mode, the
loss is cross-entropy against synthetic integer targets shaped like the output's leading dimensions (a
step's cost depends on shapes and dtypes, not on the values); the optimizer is the recipe default (AdamW,
lr 1e-3). For a recipe the batch is the first batch of the recipe's training data, and the loss,
precision, optimizer, SDPA kernel choice, threads and device are the recipe's.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

_PEAK_CHOICES = ("auto", "cached", "none")


@dataclass
class _Target:
    label: str  # the run's name: the zoo name or the recipe's name
    model_name: str
    model: Any
    inputs: Any
    loss_fn: Callable[[Any], Any] | None
    optimizer: Any
    precision: str
    device: Any
    batch_size: int
    threads: int | None
    step_context: Callable[[], Any]
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # where the profiled step differs from the recipe


def _parse_model_args(items: list[str]) -> dict[str, Any]:
    from torchkiln.errors import RecipeError
    from torchkiln.recipe import parse_override

    out: dict[str, Any] = {}
    for text in items:
        parts, value = parse_override(text)
        if len(parts) != 1:
            raise RecipeError(f"--model-arg {text!r}: expected NAME=VALUE with a plain name, e.g. n_layer=2")
        out[parts[0]] = value
    return out


def _resolve_device(name: str | None) -> Any:
    import torch

    from torchkiln.errors import KilnError

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KilnError(f"--device {name!r}: not a device; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KilnError(f"--device {name!r}: CUDA is not available here; use cpu or auto")
    return device


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def _synthetic_ce_loss(model: Any, args: tuple, device: Any) -> Callable[[Any], Any] | None:
    """Cross-entropy against fixed integer targets shaped like the output's leading dims (zoo models)."""
    import torch
    import torch.nn.functional as F

    from torchkiln.train.loss import output_logits

    was_training = model.training
    model.eval()  # probe the output shape without touching BatchNorm statistics
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.ndim == 0:
        return None  # the model returns its own loss
    logits = output_logits(out)
    if logits is None or logits.ndim < 2:
        if getattr(out, "loss", None) is not None or (isinstance(out, dict) and "loss" in out):
            return None
        from torchkiln.errors import KilnError

        raise KilnError(
            f"cannot derive a training loss for this model's output ({type(out).__name__}); "
            "use a recipe (its train.loss and data give the loss) or --mode inference"
        )
    classes = int(logits.shape[-1])
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, classes, tuple(logits.shape[:-1]), generator=gen).to(device)

    def loss_fn(output: Any) -> Any:
        lg = output_logits(output)
        return F.cross_entropy(lg.reshape(-1, classes).float(), targets.reshape(-1))

    return loss_fn


def _load_target(
    target: str,
    *,
    train: bool,
    batch_size: int | None,
    precision: str | None,
    sets: list[str],
    model_args: list[str],
    device: str | None,
    threads: int | None,
) -> _Target:
    import torch

    from torchkiln.errors import KilnError
    from torchkiln.recipe import OptimizerConfig
    from torchkiln.train.loss import move_to
    from torchkiln.train.optim import build_optimizer
    from torchkiln.train.precision import sdpa_context

    margs = _parse_model_args(model_args)
    if target.endswith(".toml"):
        from torchkiln.recipe import load_recipe
        from torchkiln.train.from_recipe import build_from_recipe
        from torchkiln.train.loss import LossComputer

        rec = load_recipe(target, list(sets) + [f"model.args.{k}={json.dumps(v)}" for k, v in margs.items()])
        cfg = rec.train
        torch.manual_seed(cfg.seed)
        model, data, _, filled = build_from_recipe(rec)
        dev = _resolve_device(device or cfg.device)
        bs = batch_size or rec.data.batch_size
        batch = next(iter(torch.utils.data.DataLoader(data, batch_size=bs, shuffle=False)))
        loss_spec: Any = cfg.loss
        if ":" in loss_spec:  # a user function given by reference, as kiln train resolves it
            from torchkiln.zoo import load_reference

            loss_spec = load_reference(loss_spec, what="loss function")
        computer = LossComputer(
            loss_spec,
            loss_count=cfg.loss_count,
            ignore_index=cfg.ignore_index,
            label_smoothing=cfg.label_smoothing,
            model=model,
        )
        args, kwargs, target_t = computer.split(batch)
        count = computer.count(target_t, kwargs, args)
        model = model.to(dev)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        notes = []
        ac = cfg.activation_checkpointing
        if train and ac is not None and ac.enabled:
            from torchkiln.train import apply_activation_checkpointing

            wrapped = apply_activation_checkpointing(model, modules=ac.modules, every=ac.every)
            notes.append(
                f"activation checkpointing on {len(wrapped)} block(s), as the recipe says: FLOPs and "
                "module times include the recomputation in backward"
            )
        if cfg.compile is not None and cfg.compile.enabled:
            notes.append("train.compile is not applied: the eager model is profiled")
        if cfg.accumulate > 1:
            notes.append(f"one micro-batch per step (the recipe accumulates {cfg.accumulate})")
        args, kwargs, target_t = move_to((args, kwargs, target_t), dev, channels_last=cfg.channels_last)
        if args and kwargs:
            raise KilnError(
                f"recipe {target}: batches with both positional and keyword inputs are not supported"
            )

        def recipe_loss(output: Any) -> Any:
            return computer.window_share(output, target_t, max(count, 1), count)

        prec = precision or cfg.precision
        backend = cfg.sdpa_backend
        opt = (
            build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay) if train else None
        )
        label = rec.name or Path(target).stem
        return _Target(
            label=label,
            model_name=rec.model.name,
            model=model,
            inputs=kwargs if kwargs else args,
            loss_fn=recipe_loss if train else None,
            optimizer=opt,
            precision=prec,
            device=dev,
            batch_size=bs,
            threads=threads if threads is not None else cfg.threads,
            step_context=lambda: sdpa_context(backend, prec, dev.type),
            config={
                "recipe": str(target),
                "set": list(sets),
                "model_args": {**filled, **rec.model.args},
                "data": rec.data.name,
                "loss": cfg.loss,
                "optimizer": cfg.optimizer.name,
            },
            notes=notes,
        )

    if sets:
        raise KilnError(f"--set applies to recipes (*.toml); {target!r} is a model name: use --model-arg")
    from torchkiln.zoo import create_model

    dev = _resolve_device(device)
    model = create_model(target, **margs).to(dev)
    example = getattr(model, "example_inputs", None)
    if example is None:
        raise KilnError(
            f"model {target!r} has no example_inputs(batch_size); profile it from a recipe instead "
            "(the recipe's data gives the batch)"
        )
    bs = batch_size or 8
    inputs = move_to(example(bs), dev)
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    loss_fn = _synthetic_ce_loss(model, args, dev) if train else None
    prec = precision or "fp32"
    opt = build_optimizer(model, OptimizerConfig(), lr=1e-3) if train else None
    return _Target(
        label=target,
        model_name=target,
        model=model,
        inputs=args,
        loss_fn=loss_fn,
        optimizer=opt,
        precision=prec,
        device=dev,
        batch_size=bs,
        threads=threads,
        step_context=lambda: sdpa_context("auto", prec, dev.type),
        config={
            "model_args": margs,
            "loss": "cross_entropy vs synthetic targets" if loss_fn else "model",
            "optimizer": "adamw",
        },
    )


def _out_dir(out: Path | None, kind: str, label: str) -> Path:
    if out is not None:
        return out
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{kind}-{_safe(label)}-{stamp}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} GiB"  # pragma: no cover


def _fmt_flops(x: float | None, per_s: bool = False) -> str:
    if x is None:
        return "-"
    suffix = "FLOP/s" if per_s else "FLOP"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{suffix}"
    return f"{x:.0f} {suffix}"


def _short(text: str, width: int = 60) -> str:
    """``text`` cut to ``width`` and escaped for rich markup (shapes and names contain brackets)."""
    from rich.markup import escape

    return escape(text if len(text) <= width else text[: width - 3] + "...")


def _print_notes(console: Any, notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {_short(note, 300)}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")


def _record(
    kind: str, label: str, results: dict[str, Any], config: dict, artifacts: dict
) -> tuple[str, Path]:
    from torchkiln.report import History

    history = History()
    run_id = history.record(kind, label, results, config=config, artifacts=artifacts)
    return run_id, history.path


def _print_profile(console: Any, results: dict[str, Any], rows: int) -> None:
    from rich.table import Table

    cuda = any("self_device_ms" in r for r in results["top_ops"])
    ops = Table(
        title=f"top operators by self {'device' if cuda else 'CPU'} time "
        f"(totals over {results['steps']} profiled steps)",
        title_justify="left",
    )
    for col, justify in (
        ("operator", "left"),
        ("self ms", "right"),
        ("self %", "right"),
        ("total ms", "right"),
    ):
        ops.add_column(col, justify=justify)
    if cuda:
        ops.add_column("self device ms", justify="right")
    ops.add_column("calls", justify="right")
    ops.add_column("input shapes (costliest)")
    for r in results["top_ops"][:rows]:
        cells = [_short(r["name"], 80), f"{r['self_ms']:.2f}", f"{r['self_pct']:.1f}", f"{r['total_ms']:.2f}"]
        if cuda:
            cells.append(f"{r.get('self_device_ms', 0.0):.2f}")
        cells += [str(r["calls"]), _short(r["input_shapes"])]
        ops.add_row(*cells)
    console.print(ops)

    mods = Table(title="modules (forward time, module::<name> ranges)", title_justify="left")
    for col, justify in (("module", "left"), ("type", "left"), ("total ms", "right"), ("calls", "right")):
        mods.add_column(col, justify=justify)
    for r in results["modules"][:rows]:
        mods.add_row(_short(r["name"], 80), _short(r["type"]), f"{r['total_ms']:.2f}", str(r["calls"]))
    console.print(mods)

    summary = Table(title="summary", show_header=False, title_justify="left")
    summary.add_column("")
    summary.add_column("", justify="right")
    summary.add_row(
        "model / mode / batch", f"{results['model']} / {results['mode']} / {results['batch_size']}"
    )
    summary.add_row(
        "precision / device / threads", f"{results['precision']} / {results['device']} / {results['threads']}"
    )
    if results.get("step_ms") is not None:
        summary.add_row(
            "step time (unprofiled, median)",
            f"{results['step_ms']:.2f} ms ({results['step_ms_min']:.2f}..{results['step_ms_max']:.2f})",
        )
    if results.get("profiled_step_ms") is not None:
        summary.add_row("step time under the profiler", f"{results['profiled_step_ms']:.2f} ms")
    summary.add_row("FLOPs per step", _fmt_flops(results.get("flops_per_step")))
    summary.add_row("achieved", _fmt_flops(results.get("achieved_flops_per_s"), per_s=True))
    summary.add_row("machine peak (GEMM)", _fmt_flops(results.get("peak_flops_per_s"), per_s=True))
    mfu = results.get("mfu")
    summary.add_row("MFU", f"{100 * mfu:.2f}%" if mfu is not None else "-")
    if results.get("uncounted_ops"):
        summary.add_row("ops without a FLOP formula", str(len(results["uncounted_ops"])))
    memory = results.get("memory") or {}
    summary.add_row(
        f"peak memory ({_short(memory.get('source', '-'))})", _fmt_bytes(memory.get("peak_bytes"))
    )
    trace = results.get("trace") or {}
    if trace:
        summary.add_row(
            "trace",
            f"{_short(str(trace.get('path')), 200)} ({_fmt_bytes(trace.get('bytes'))}, "
            f"{trace.get('dropped_events', 0)} events dropped)",
        )
    console.print(summary)


def _print_memory(console: Any, results: dict[str, Any], rows: int) -> None:
    from rich.table import Table

    phases = Table(title=f"memory per phase ({_short(results['source'], 80)})", title_justify="left")
    for col in ("phase", "allocated", "peak", "delta", "RSS", "RSS delta"):
        phases.add_column(col, justify="left" if col == "phase" else "right")
    for p in results["phases"]:
        phases.add_row(
            p["phase"],
            _fmt_bytes(p["allocated_bytes"]),
            _fmt_bytes(p["peak_bytes"]),
            _fmt_bytes(p["delta_bytes"]),
            _fmt_bytes(p["rss_bytes"]),
            _fmt_bytes(p.get("rss_delta_bytes")),
        )
    console.print(phases)

    acts = Table(title="activation memory by module (saved for backward)", title_justify="left")
    for col in ("module", "type", "saved", "with submodules", "tensors"):
        acts.add_column(col, justify="left" if col in ("module", "type") else "right")
    by_saved = sorted(results["activation_bytes_by_module"], key=lambda r: -r["saved_bytes"])
    for r in [r for r in by_saved if r["saved_bytes"] > 0][:rows]:
        acts.add_row(
            _short(r["name"], 80),
            _short(r["type"]),
            _fmt_bytes(r["saved_bytes"]),
            _fmt_bytes(r["total_saved_bytes"]),
            str(r["tensors"]),
        )
    console.print(acts)

    summary = Table(title="summary", show_header=False, title_justify="left")
    summary.add_column("")
    summary.add_column("", justify="right")
    summary.add_row("model / batch", f"{results['model']} / {results['batch_size']}")
    summary.add_row(
        "precision / device / threads", f"{results['precision']} / {results['device']} / {results['threads']}"
    )
    summary.add_row("optimizer", str(results["optimizer"]))
    summary.add_row("initial", _fmt_bytes(results["initial_bytes"]))
    summary.add_row("peak", _fmt_bytes(results["peak_bytes"]))
    summary.add_row("final (after the optimizer step)", _fmt_bytes(results["final_bytes"]))
    summary.add_row("activations (saved for backward)", _fmt_bytes(results["activation_bytes"]))
    console.print(summary)
    console.print(f"[dim]allocated: {_short(results['sources']['allocated'], 200)}; RSS: psutil[/]")


def register(app: typer.Typer) -> None:
    """Add ``kiln profile`` and ``kiln memory`` to ``app``."""

    @app.command("profile")
    def profile_command(
        target: str = typer.Argument(
            ..., help="Zoo model name (kiln zoo) or recipe file (*.toml).", show_default=False
        ),
        mode: str = typer.Option("train", "--mode", help="train (forward+backward+optimizer) or inference."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", "-b", min=1, help="Default: 8 or the recipe's."
        ),
        precision: str | None = typer.Option(
            None, "--precision", help="fp32, bf16 or fp16 (default: fp32 or the recipe's)."
        ),
        steps: int = typer.Option(3, "--steps", min=1, help="Profiled (active) steps."),
        wait: int = typer.Option(1, "--wait", min=0, help="Steps run before the profiler records."),
        warmup: int = typer.Option(1, "--warmup", min=0, help="Steps recorded then discarded."),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Run directory (default runs/profile-<name>-<time>)."
        ),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override a recipe key, e.g. --set data.batch_size=16."
        ),
        model_arg: list[str] = typer.Option(
            [], "--model-arg", "-m", help="Model argument, e.g. -m n_layer=2."
        ),
        threads: int | None = typer.Option(
            None, "--threads", min=1, help="torch.set_num_threads (default: current)."
        ),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        max_trace_mb: float = typer.Option(20.0, "--max-trace-mb", min=0.001, help="Bound on trace.json.gz."),
        rows: int = typer.Option(25, "--rows", min=1, help="Rows in the operator and module tables."),
        peak: str = typer.Option(
            "auto", "--peak", help="Machine peak for MFU: auto (measure once, cached), cached, none."
        ),
    ) -> None:
        """Profile a few steps: top operators, modules, FLOPs and MFU, memory, and a Perfetto trace.

        Writes <out>/profile.json and <out>/trace.json.gz (open it in https://ui.perfetto.dev) and records
        the run in the history.
        """
        from rich.console import Console

        from torchkiln.errors import KilnError
        from torchkiln.measure import profile as run_profile

        if mode not in ("train", "inference"):
            raise KilnError(f"--mode {mode!r}: accepted: train, inference")
        if peak not in _PEAK_CHOICES:
            raise KilnError(f"--peak {peak!r}: accepted: {', '.join(_PEAK_CHOICES)}")
        console = Console()
        t = _load_target(
            target,
            train=mode == "train",
            batch_size=batch_size,
            precision=precision,
            sets=set_,
            model_args=model_arg,
            device=device,
            threads=threads,
        )
        out_dir = _out_dir(out, "profile", t.label)
        console.print(
            f"[bold]kiln profile[/] {_short(target, 200)}  mode={mode} batch={t.batch_size} "
            f"precision={t.precision} device={t.device} steps={wait}+{warmup}+{steps} -> "
            f"{_short(str(out_dir), 200)}"
        )
        _print_notes(console, t.notes)
        result = run_profile(
            t.model,
            t.inputs,
            mode=mode,  # type: ignore[arg-type]
            loss_fn=t.loss_fn,
            optimizer=t.optimizer,
            precision=t.precision,
            wait=wait,
            warmup=warmup,
            active=steps,
            out_dir=out_dir,
            max_trace_mb=max_trace_mb,
            row_limit=max(rows, 25),
            peak=None if peak == "none" else peak,
            threads=t.threads,
            step_context=t.step_context,
            model_name=t.model_name,
        )
        results = result.to_results(model_name=t.model_name, batch_size=t.batch_size)
        _write_json(out_dir / "profile.json", results)
        _print_profile(console, results, rows)
        config = {
            "target": target,
            "mode": mode,
            "batch_size": t.batch_size,
            "precision": t.precision,
            "steps": steps,
            "wait": wait,
            "warmup": warmup,
            "threads": result.threads,
            "device": str(t.device),
            "max_trace_mb": max_trace_mb,
            "notes": t.notes,
            **t.config,
        }
        artifacts = {"run_dir": str(out_dir), "results": str(out_dir / "profile.json")}
        if result.trace_path:
            artifacts["trace"] = result.trace_path
        run_id, where = _record("profile", t.label, results, config, artifacts)
        console.print(
            f"wrote {_short(str(out_dir / 'profile.json'), 200)}; recorded run [bold]{run_id}[/] in "
            f"{_short(str(where), 200)}"
        )

    @app.command("memory")
    def memory_command(
        target: str = typer.Argument(
            ..., help="Zoo model name (kiln zoo) or recipe file (*.toml).", show_default=False
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", "-b", min=1, help="Default: 8 or the recipe's."
        ),
        precision: str | None = typer.Option(
            None, "--precision", help="fp32, bf16 or fp16 (default: fp32 or the recipe's)."
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Run directory (default runs/memory-<name>-<time>)."
        ),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override a recipe key, e.g. --set data.batch_size=16."
        ),
        model_arg: list[str] = typer.Option(
            [], "--model-arg", "-m", help="Model argument, e.g. -m n_layer=2."
        ),
        threads: int | None = typer.Option(
            None, "--threads", min=1, help="torch.set_num_threads (default: current)."
        ),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        rows: int = typer.Option(20, "--rows", min=1, help="Rows in the activation table."),
    ) -> None:
        """Memory of one training step: initial, forward, backward, optimizer, peak; activations per module.

        Writes <out>/memory.json and records the run in the history.
        """
        from rich.console import Console

        from torchkiln.measure import memory_analysis

        console = Console()
        t = _load_target(
            target,
            train=True,
            batch_size=batch_size,
            precision=precision,
            sets=set_,
            model_args=model_arg,
            device=device,
            threads=threads,
        )
        out_dir = _out_dir(out, "memory", t.label)
        console.print(
            f"[bold]kiln memory[/] {_short(target, 200)}  batch={t.batch_size} precision={t.precision} "
            f"device={t.device} -> {_short(str(out_dir), 200)}"
        )
        _print_notes(console, t.notes)
        report = memory_analysis(
            t.model,
            t.inputs,
            t.loss_fn,
            t.optimizer,
            precision=t.precision,
            threads=t.threads,
            step_context=t.step_context,
            model_name=t.model_name,
        )
        results = report.to_results(model_name=t.model_name, batch_size=t.batch_size)
        _write_json(out_dir / "memory.json", results)
        _print_memory(console, results, rows)
        config = {
            "target": target,
            "batch_size": t.batch_size,
            "precision": t.precision,
            "threads": report.threads,
            "device": str(t.device),
            "notes": t.notes,
            **t.config,
        }
        artifacts = {"run_dir": str(out_dir), "results": str(out_dir / "memory.json")}
        run_id, where = _record("memory", t.label, results, config, artifacts)
        console.print(
            f"wrote {_short(str(out_dir / 'memory.json'), 200)}; recorded run [bold]{run_id}[/] in "
            f"{_short(str(where), 200)}"
        )
