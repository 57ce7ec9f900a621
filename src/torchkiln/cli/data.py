"""``kiln data pack|info|verify``: build, describe and check memory-mapped indexed datasets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

TEXT_MODES = ("file", "line", "block")


def _text_samples(paths: list[Path], mode: str, block: int, glob: str) -> Iterator[dict[str, Any]]:
    import numpy as np

    for path in paths:
        files = sorted(p for p in path.rglob(glob) if p.is_file()) if path.is_dir() else [path]
        for f in files:
            data = f.read_bytes()
            if mode == "file":
                chunks = [data]
            elif mode == "line":
                chunks = [line for line in data.splitlines() if line]
            else:
                chunks = [data[i : i + block] for i in range(0, len(data), block)]
            for chunk in chunks:
                yield {"tokens": np.frombuffer(chunk, dtype=np.uint8)}


def _jsonl_samples(paths: list[Path], dtype: str) -> Iterator[dict[str, Any]]:
    import numpy as np

    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise typer.BadParameter(f"{path}:{lineno}: not JSON: {exc}") from None
                if isinstance(rec, list):
                    yield {"tokens": np.asarray(rec, dtype=dtype)}
                elif isinstance(rec, dict):
                    yield {
                        k: (np.asarray(v, dtype=dtype) if isinstance(v, list) else v) for k, v in rec.items()
                    }
                else:
                    raise typer.BadParameter(f"{path}:{lineno}: expected a list of tokens or an object")


def _npy_samples(paths: list[Path]) -> tuple[Iterator[dict[str, Any]], int]:
    import numpy as np

    arrays = {p.stem: np.load(p, mmap_mode="r") for p in paths}
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise typer.BadParameter(f".npy files must have the same number of rows (first dim): {counts}")
    n = next(iter(counts.values()))
    return ({name: np.asarray(a[i]) for name, a in arrays.items()} for i in range(n)), n


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Memory-mapped indexed datasets: pack, info, verify.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("pack")
    def pack(
        inputs: list[Path] = typer.Argument(..., help="Text files/directories, .jsonl files or .npy files."),
        out: Path = typer.Option(..., "--out", "-o", help="Dataset stem: writes STEM.idx and STEM.bin."),
        mode: str = typer.Option("file", help="Text: one sample per 'file', 'line' or fixed 'block'."),
        block_size: int = typer.Option(1024, help="Bytes per sample with --mode block."),
        glob: str = typer.Option("*", help="Files to take from directories (e.g. '*.py')."),
        dtype: str = typer.Option("int32", help="Token dtype for JSONL token lists."),
        checksums: bool = typer.Option(True, "--checksums/--no-checksums", help="crc32 per 4 MiB."),
    ) -> None:
        """Pack text (byte tokens), JSONL (token lists or objects of fields) or .npy arrays (one field per
        file, named by its stem, rows are samples) into an indexed dataset."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from torchkiln.data.indexed import IndexedDatasetWriter

        console = Console(stderr=True)
        suffixes = {p.suffix for p in inputs if p.is_file()}
        total = None
        if suffixes == {".npy"}:
            samples, total = _npy_samples(inputs)
            fields = None
        elif suffixes == {".jsonl"}:
            samples, fields = _jsonl_samples(inputs, dtype), None
        else:
            if mode not in TEXT_MODES:
                raise typer.BadParameter(f"--mode {mode!r}; accepted: {', '.join(TEXT_MODES)}")
            samples, fields = _text_samples(inputs, mode, block_size, glob), {"tokens": ("uint8", (None,))}
        with Progress(
            TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("pack", total=total)
            with IndexedDatasetWriter(out, fields, checksums=checksums) as writer:
                for sample in samples:
                    writer.add(sample)
                    if writer.count % 256 == 0:
                        progress.update(task, completed=writer.count)
                progress.update(task, completed=writer.count)
        console.print(f"[green]packed[/] {writer.count} samples -> {out}.idx, {out}.bin")

    @data_app.command("info")
    def info(path: Path = typer.Argument(..., help="Dataset stem, STEM.idx or STEM.bin.")) -> None:
        """Counts, fields, length statistics and a length histogram."""
        import numpy as np
        from rich.console import Console
        from rich.table import Table

        from torchkiln.data.indexed import IndexedDataset

        console = Console()
        ds = IndexedDataset(path)
        console.print(f"[bold]{ds.stem}[/]: {len(ds)} samples, {ds.nbytes / 1e6:.2f} MB of data")
        table = Table("field", "dtype", "shape", "min", "mean", "median", "p95", "max", "total")
        for name, f in ds.all_fields.items():
            if f.variable and len(ds):
                n = ds.lengths(name)
                stats = [n.min(), f"{n.mean():.1f}", np.median(n), np.percentile(n, 95), n.max(), n.sum()]
                table.add_row(name, f.dtype, str(f.shape), *map(str, stats))
            else:
                table.add_row(name, f.dtype, str(f.shape), *["-"] * 6)
        console.print(table)
        for name, f in ds.all_fields.items():
            if not f.variable or not len(ds):
                continue
            n = ds.lengths(name)
            counts, edges = np.histogram(n, bins=min(12, max(1, len(np.unique(n)))))
            console.print(f"length histogram of [bold]{name}[/]")
            top = max(int(counts.max()), 1)
            for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
                console.print(f"  {lo:>10.0f}..{hi:<10.0f} {'█' * int(40 * c / top):<40} {c}")

    @data_app.command("verify")
    def verify(path: Path = typer.Argument(..., help="Dataset stem, STEM.idx or STEM.bin.")) -> None:
        """Check a dataset fully: headers, version, index, sizes, offsets and per-chunk crc32."""
        from rich.console import Console

        from torchkiln.data.indexed import verify_indexed_dataset

        report = verify_indexed_dataset(path)
        what = (
            f"{report['checksummed_bytes']} bytes checksummed"
            if report["checksums"]
            else "no checksums stored"
        )
        Console().print(f"[green]ok[/] {report['path']}: {report['count']} samples, {what}")
