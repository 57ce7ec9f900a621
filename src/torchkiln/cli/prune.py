"""``kiln prune MODEL``: structured (channels/neurons/heads) or unstructured (magnitude) pruning, the pruned
artifact written, the before/after table printed and recorded in the history (kind ``compress``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from torchkiln.targets import Target

__all__ = ["record_compress", "register", "resolve_model"]


def resolve_model(target: str, *, weights: Path | None = None, overrides: Sequence[str] = ()) -> Target:
    """The model ``kiln prune`` (and ``kiln distill``, for its recipe) is given: a zoo name, user code, a
    recipe ``.toml`` (its data calibrates and scores), a training run or a pruned artifact ``.pt``."""
    from torchkiln.targets import NAMED_KINDS, resolve_target

    return resolve_target(
        target, weights=weights, overrides=overrides, accept=NAMED_KINDS, command="kiln prune"
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
            help="A zoo model name, pkg.mod:fn or file.py:fn, a recipe .toml, a `kiln train` run (its "
            "directory or model.pt) or a pruned .pt; recipes and runs (and pruned files made from them) "
            "bring their data, which calibrates and scores.",
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
        pruned artifact that `load_pruned` and every kiln command taking a model read back. magnitude
        zeroes weights and writes them in a sparse (CSR) format, the only way zeros take less space.
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
        resolved = resolve_model(target, weights=weights, overrides=set_)
        before = resolved.model
        inputs = resolved.example_inputs(batch_size)
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
                # The recipe travels with the artifact, so what reads it back has the data too.
                recipe = resolved.recipe.model_dump(mode="json") if resolved.recipe is not None else None
                save_pruned(
                    after,
                    out_path,
                    model_ref=resolved.model_ref,
                    model_args=resolved.model_args,
                    metadata={"recipe": recipe} if recipe is not None else None,
                )
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
                inputs,
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
