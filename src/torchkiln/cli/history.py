"""``kiln history``: list recorded runs, show one, compare two (bench: p50 per variant; train: metrics)."""

from __future__ import annotations

import json
from typing import Any

import typer

__all__ = ["register"]


def _history(ctx: typer.Context) -> Any:
    from torchkiln.report.history import History

    return History((ctx.obj or {}).get("db"))


def _list_runs(db: str | None, kind: str | None, name: str | None, limit: int, json_out: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from torchkiln.report.history import KINDS, History, key_figures

    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(f"unknown kind {kind!r}; accepted: {', '.join(KINDS)}", param_hint="--kind")
    history = History(db)
    runs = history.list(kind=kind, name=name, limit=limit)
    if json_out:
        rows = [
            {
                "id": r.id,
                "kind": r.kind,
                "name": r.name,
                "created": r.created,
                "status": r.status,
                "key_figures": key_figures(r),
            }
            for r in runs
        ]
        typer.echo(json.dumps(rows))
        return
    console = Console()
    if not runs:
        what = " ".join(x for x in (kind, name) if x) or "recorded"
        console.print(f"no {what} runs in {history.path}", highlight=False)
        return
    table = Table(title=f"runs in {history.path} (newest first)", title_justify="left")
    table.add_column("id", no_wrap=True)
    for col in ("kind", "name", "created", "key figures"):
        table.add_column(col, overflow="fold")
    for r in runs:
        status = "" if r.status == "ok" else f" [red]({r.status})[/]"
        table.add_row(
            r.id, r.kind, r.name, r.created.replace("T", " ").replace("+00:00", ""), key_figures(r) + status
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``kiln history`` (list), ``kiln history show RUN`` and ``kiln history compare A B`` to ``app``."""
    history_app = typer.Typer(
        help="Recorded runs: list them (the default), show one, compare two.", no_args_is_help=False
    )

    @history_app.callback(invoke_without_command=True)
    def history(
        ctx: typer.Context,
        kind: str | None = typer.Option(
            None, "--kind", "-k", help="Only runs of this kind (bench, train, ...)."
        ),
        name: str | None = typer.Option(None, "--name", "-n", help="Only runs with this name."),
        limit: int = typer.Option(20, "--limit", min=1, help="At most this many runs, newest first."),
        db: str | None = typer.Option(
            None, "--db", help="History file (default $TORCHKILN_HISTORY or runs/history.sqlite)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the list as JSON."),
    ) -> None:
        """List recorded runs (id, kind, name, created, key figures), newest first."""
        ctx.obj = {"db": db}
        if ctx.invoked_subcommand is None:
            _list_runs(db, kind, name, limit, json_out)

    @history_app.command("show")
    def show(
        ctx: typer.Context,
        run: str = typer.Argument(
            ..., help="Run id, unique id prefix, or kind:name (newest).", show_default=False
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the whole run as JSON."),
    ) -> None:
        """Print one run: what was measured, on what, and the results."""
        from rich.console import Console
        from rich.table import Table

        from torchkiln.report.history import bench_variants

        r = _history(ctx).get(run)
        if json_out:
            typer.echo(json.dumps(r.to_dict(), default=str, indent=2))
            return
        console = Console()
        info = Table(show_header=False, title=f"run {r.id}", title_justify="left")
        info.add_column("", style="bold")
        info.add_column("", overflow="fold")
        cpu = (r.env.get("cpu") or {}) if isinstance(r.env, dict) else {}
        torch_version = ((r.env.get("torch") or {}) if isinstance(r.env, dict) else {}).get("version")
        for key, value in (
            ("kind", r.kind),
            ("name", r.name),
            ("created", r.created),
            ("status", r.status),
            ("parent", r.parent),
            ("git commit", r.git_commit),
            ("cpu", cpu.get("model")),
            ("torch", torch_version),
            ("config", json.dumps(r.config, default=str) if r.config else None),
            ("artifacts", ", ".join(f"{k}: {v}" for k, v in r.artifacts.items()) or None),
        ):
            if value is not None:
                info.add_row(key, str(value))
        console.print(info)
        if bench_variants(r.results):
            from torchkiln.cli.bench import _print_sweep, print_bench_table

            print_bench_table(console, r.results, title="variants")
            _print_sweep(console, r.results)
        else:
            console.print_json(json.dumps(r.results, default=str))

    @history_app.command("compare")
    def compare(
        ctx: typer.Context,
        run_a: str = typer.Argument(
            ..., help="The reference run (id, prefix or kind:name).", show_default=False
        ),
        run_b: str = typer.Argument(..., help="The run compared with it.", show_default=False),
        json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    ) -> None:
        """Compare two runs of one kind: bench runs variant by variant (p50, B relative to A), train runs
        by their final metrics."""
        from rich.console import Console
        from rich.table import Table

        from torchkiln.report.history import compare_runs

        history = _history(ctx)
        a, b = history.get(run_a), history.get(run_b)
        result = compare_runs(a, b)
        if json_out:
            typer.echo(json.dumps(result, default=str))
            return
        console = Console()
        table = Table(title=f"{a.kind}: {a.id} (A) vs {b.id} (B)", title_justify="left")
        if "only_base" in result:  # bench-shaped
            for col in ("variant", "A p50 ms", "B p50 ms", "B/A time", "change"):
                table.add_column(col, justify="left" if col == "variant" else "right")
            for row in result["rows"]:
                table.add_row(
                    row["variant"],
                    f"{row['base_p50_ms']:.4g}",
                    f"{row['new_p50_ms']:.4g}",
                    f"{row['time_ratio']:.3f}",
                    f"{100 * row['change']:+.1f}%",
                    style="red" if row["change"] > 0.05 else ("green" if row["change"] < -0.05 else None),
                )
            only = [("only in A", result["only_base"]), ("only in B", result["only_new"])]
        else:
            for col in ("metric", "A", "B", "B - A"):
                table.add_column(col, justify="left" if col == "metric" else "right")
            for row in result["rows"]:
                table.add_row(row["metric"], f"{row['a']:.4g}", f"{row['b']:.4g}", f"{row['diff']:+.4g}")
            only = [("only in A", result["only_a"]), ("only in B", result["only_b"])]
        console.print(table)
        if not result["rows"]:
            console.print("nothing in common to compare", style="yellow")
        for label, names in only:
            if names:
                console.print(f"{label}: {', '.join(names)}", style="dim", highlight=False)
        for warning in result.get("warnings", []):
            console.print(f"note: {warning}", style="yellow", highlight=False)

    app.add_typer(history_app, name="history")
