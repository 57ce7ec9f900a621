"""``kiln prune MODEL``: structured (channels/neurons/heads) or unstructured (magnitude) pruning, the pruned
artifact written, the before/after table printed and recorded in the history (kind ``compress``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

__all__ = ["ResolvedModel", "record_compress", "register", "resolve_model"]


@dataclass
class ResolvedModel:
    """A model given on the command line, with what is needed to rebuild, feed and score it."""

    model: Any
    name: str
    model_ref: str | None
    model_args: dict[str, Any]
    input_fn: Any
    train_data: Any = None
    val_data: Any = None
    recipe: Any = None
    source: dict[str, Any] = field(default_factory=dict)


def _load_state(model: Any, path: Path) -> None:
    """``--weights``: a state_dict file or a training checkpoint (its model part)."""
    from torchkiln.errors import KilnError
    from torchkiln.export.models import load_weights

    if not path.is_file():
        raise KilnError(f"--weights {path}: no such file")
    load_weights(model, path)


def resolve_model(
    target: str, *, weights: Path | None = None, overrides: list[str] | None = None
) -> ResolvedModel:
    """A zoo name, a recipe ``.toml`` (its data: calibration and evaluation) or a pruned artifact ``.pt``."""
    from torchkiln.errors import KilnError

    overrides = list(overrides or [])
    if target.endswith(".toml"):
        from torchkiln.cli.bench import bench_inputs_from_recipe
        from torchkiln.recipe import load_recipe
        from torchkiln.train.from_recipe import build_from_recipe

        if not Path(target).is_file():
            raise KilnError(f"recipe {target} does not exist")
        rec = load_recipe(target, overrides)
        model, train, val, filled = build_from_recipe(rec)
        if weights is not None:
            _load_state(model, weights)
        return ResolvedModel(
            model=model,
            name=rec.name or Path(target).stem,
            model_ref=rec.model.name,
            model_args={**dict(rec.model.args), **filled},
            input_fn=lambda bs: bench_inputs_from_recipe(train, bs),
            train_data=train,
            val_data=val,
            recipe=rec,
            source={"recipe": target, "weights": str(weights) if weights else None},
        )
    if overrides:
        raise KilnError("--set overrides apply to recipes only; give a .toml recipe or drop --set")
    if target.endswith(".pt"):
        from torchkiln.compress.prune import ModelRef, load_pruned, read_pruned_metadata

        if not Path(target).is_file():
            raise KilnError(f"{target}: no such file")
        model = load_pruned(target)
        ref = ModelRef.from_dict(read_pruned_metadata(target)["model_ref"])
        example = getattr(model, "example_inputs", None)
        return ResolvedModel(
            model=model,
            name=Path(target).stem,
            model_ref=ref.name,
            model_args=dict(ref.args),
            input_fn=example if callable(example) else None,
            source={"pruned": target},
        )
    from torchkiln.zoo import create_model, list_models

    if target not in list_models() and ":" not in target:
        raise KilnError(
            f"{target!r} is not a zoo model, a recipe (.toml) or a pruned artifact (.pt); zoo models: "
            f"{', '.join(list_models())}"
        )
    model = create_model(target)
    if weights is not None:
        _load_state(model, weights)
    example = getattr(model, "example_inputs", None)
    return ResolvedModel(
        model=model,
        name=target,
        model_ref=target,
        model_args={},
        input_fn=example if callable(example) else None,
        source={"zoo": target, "weights": str(weights) if weights else None},
    )


def record_compress(
    name: str, results: dict[str, Any], config: dict[str, Any], artifacts: dict[str, str]
) -> str:
    from torchkiln.report.history import History

    return History().record("compress", name, results, config=config, artifacts=artifacts)


def _accuracy_fn(val_data: Any) -> Any:
    if val_data is None:
        return None
    from torchkiln.train import evaluate

    def accuracy(model: Any) -> float:
        return evaluate(model, val_data).get("val_accuracy", float("nan"))

    return accuracy


def register(app: typer.Typer) -> None:
    """Add ``kiln prune`` to ``app``."""

    @app.command("prune")
    def prune_command(
        target: str = typer.Argument(
            ...,
            help="A zoo model name, a recipe .toml (its data calibrates and scores) or a pruned .pt file.",
            show_default=False,
        ),
        weights: Path | None = typer.Option(
            None,
            "--weights",
            "-w",
            help="Trained weights to load first (model.pt or a step-*.pt checkpoint).",
        ),
        method: str = typer.Option(
            "channels",
            "--method",
            "-m",
            help="channels: remove channels/neurons/heads physically (smaller and faster); magnitude: zero "
            "the smallest weights (sparse; saves space only in a sparse format).",
        ),
        ratio: float = typer.Option(0.5, "--ratio", "-r", help="channels: fraction of channels removed."),
        head_ratio: float | None = typer.Option(
            None, "--head-ratio", help="channels: fraction of attention heads removed (default: --ratio)."
        ),
        round_to: int = typer.Option(8, "--round-to", min=1, help="channels: keep widths multiples of this."),
        importance: str = typer.Option("l2", "--importance", help="channels: l2, l1, taylor or random."),
        sparsity: float = typer.Option(0.5, "--sparsity", help="magnitude: fraction of weights zeroed."),
        scope: str = typer.Option("layer", "--scope", help="magnitude: 'layer' (each layer) or 'global'."),
        ignore: list[str] = typer.Option(
            [], "--ignore", help="Module-name pattern never pruned (repeatable), e.g. 'blocks.0.*'."
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Pruned artifact path (default runs/prune/<name>-<method>.pt)."
        ),
        batch_size: int = typer.Option(
            32, "--batch-size", "-b", min=1, help="Batch of the latency comparison."
        ),
        threads: int = typer.Option(1, "--threads", "-t", min=1, help="torch.set_num_threads while timing."),
        mode: str = typer.Option(
            "eager", "--mode", help="Execution mode of the comparison: eager or compile."
        ),
        max_time_s: float = typer.Option(
            5.0, "--max-time-s", min=0.1, help="Time budget of the latency rounds."
        ),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Recipe override, e.g. --set model.args.hidden=[64]."
        ),
        record: bool = typer.Option(True, "--record/--no-record", help="Record the run in the history."),
    ) -> None:
        """Prune a model and measure what it bought: parameters, artifact size, FLOPs, latency, accuracy.

        channels (default) removes channels, neurons and attention heads through Torch-Pruning's dependency
        graph, keeps the output layer, re-estimates BatchNorm on the recipe's training data and writes a
        pruned artifact that `load_pruned` (and `kiln prune/distill`) read back. magnitude zeroes weights
        and writes them in a sparse (CSR) format, the only way zeros take less space.
        Fine-tune the result with `kiln distill`.
        """
        import copy
        import warnings

        import torch
        from rich.console import Console

        from torchkiln.compress.compare import compare_models
        from torchkiln.errors import KilnError

        console = Console()
        if method not in ("channels", "magnitude"):
            raise KilnError(f"--method {method!r} is unknown; accepted: channels, magnitude")
        if mode not in ("eager", "compile"):
            raise KilnError(f"--mode {mode!r} is unknown; accepted: eager, compile")
        resolved = resolve_model(target, weights=weights, overrides=list(set_))
        if resolved.input_fn is None:
            raise KilnError(
                f"{target}: no example inputs (the model has no example_inputs method); give a recipe so "
                "inputs come from its data"
            )
        before = resolved.model.eval()
        inputs = resolved.input_fn(batch_size)
        inputs = inputs if isinstance(inputs, (tuple, list, dict)) else (inputs,)
        after = copy.deepcopy(before)
        out_path = out or Path("runs") / "prune" / f"{resolved.name}-{method}.pt"
        console.print(
            f"[bold]kiln prune[/] {target}: {method}"
            + (f" ratio {ratio}" if method == "channels" else f" sparsity {sparsity} ({scope})")
            + f" -> {out_path}",
            highlight=False,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if method == "channels":
                from torchkiln.compress.api import prune
                from torchkiln.compress.prune import ChannelPrune, save_pruned

                config: Any = ChannelPrune(
                    ratio=ratio,
                    head_ratio=head_ratio,
                    round_to=round_to,
                    importance=importance,
                    ignored=tuple(ignore),
                )
                prune(after, config, example_inputs=inputs, calibration=resolved.train_data)
                if resolved.model_ref is None:
                    raise KilnError(f"{target}: cannot record how to rebuild this model")
                save_pruned(after, out_path, model_ref=resolved.model_ref, model_args=resolved.model_args)
            else:
                from torchkiln.compress.api import prune
                from torchkiln.compress.sparse import MagnitudePrune, save_sparse

                config = MagnitudePrune(sparsity=sparsity, scope=scope, ignored=tuple(ignore))
                prune(after, config, example_inputs=inputs)
                save_sparse(after, out_path)
        for w in caught:
            if issubclass(w.category, UserWarning) and "torch_pruning" not in str(w.filename):
                console.print(f"[yellow]warning:[/] {w.message}", highlight=False)

        import tempfile

        with tempfile.TemporaryDirectory(prefix="kiln-prune-") as tmp:
            before_path = Path(tmp) / "before.pt"
            torch.save(before.state_dict(), before_path)
            report = compare_models(
                before,
                after,
                inputs if not isinstance(inputs, list) else tuple(inputs),
                eval_fn=_accuracy_fn(resolved.val_data),
                artifacts={"before": before_path, "after": out_path},
                mode=mode,  # type: ignore[arg-type]
                threads=threads,
                max_time_s=max_time_s,
                name=resolved.name,
                technique=f"prune/{method}",
            )
        if method == "magnitude":
            from torchkiln.compress.sparse import sparsity_report

            sp = sparsity_report(after)
            report.notes.append(
                f"{100 * sp['sparsity']:.1f}% of the prunable weights are zero; dense kernels still multiply "
                "every zero (no speedup), and the dense state_dict would be as large as before: the artifact "
                "size above is the sparse (CSR) file"
            )
        console.print(report.table())
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
        console.print(f"pruned artifact: {out_path}", highlight=False)
        if record:
            config_dict = {
                "target": target,
                **resolved.source,
                "method": method,
                "config": {k: v for k, v in vars(config).items()},
                "batch_size": batch_size,
                "threads": threads,
                "mode": mode,
            }
            run_id = record_compress(
                resolved.name, report.history_results(), config_dict, {"pruned": str(out_path)}
            )
            console.print(f"recorded run [bold]{run_id}[/] (kiln history)", highlight=False)
