"""What a training run shows and writes: a rich progress bar (loss, learning rate, throughput), metrics
as JSON lines, and TensorBoard event files when ``tensorboard`` is installed.

The bar is redrawn at most twice a second, from the training thread, and metrics are written every
``log_every`` steps, so the per-step cost stays in microseconds (see ``benchmarks/train_overhead.py``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

PLAIN_EVERY_S = 10.0  # without a terminal: one progress line per this many seconds (none in short runs)
REFRESH_S = 0.5  # a redraw costs ~1-2 ms of Python; twice a second keeps the bar live and the cost < 0.5 %


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Monitor:
    def __init__(
        self,
        *,
        total_steps: int,
        out_dir: str | os.PathLike | None,
        progress: str = "auto",
        tensorboard: bool = True,
        description: str = "train",
    ) -> None:
        self.total_steps = total_steps
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._jsonl = None
        self._tb = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is an optional extra
                    SummaryWriter = None
                if SummaryWriter is not None:
                    self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        show = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        # Not a terminal (a log file, CI): a plain line on stderr every PLAIN_EVERY_S instead of a bar.
        self._plain = progress == "auto" and not show
        self._description = description
        self._started = time.perf_counter()
        self._progress = None
        self._task = None
        self._pending = 0
        self._last_refresh = 0.0
        self._fields: dict[str, str] = {"loss": "-", "lr": "-", "rate": "-"}
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),  # stdout stays clean for the caller's output
                auto_refresh=False,  # redrawn from step() at most every REFRESH_S: no render thread
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total_steps, **self._fields)

    # ------------------------------------------------------------------------------------------ per step

    def advance_to(self, step: int) -> None:
        """Show ``step`` steps as done (a resumed run starts part-way)."""
        if self._progress is not None and step:
            self._progress.update(self._task, completed=step)

    def step(self, step: int, loss: float, lr: float, samples: int, seconds: float) -> None:
        """Called once per optimizer step; cheap unless a refresh is due."""
        if self._progress is None:
            if self._plain:
                now = time.perf_counter()
                if now - self._last_refresh >= PLAIN_EVERY_S and now - self._started >= PLAIN_EVERY_S:
                    self._last_refresh = now
                    total = f"/{self.total_steps}" if self.total_steps else ""
                    rate = f"  {samples / seconds:,.0f} samples/s" if seconds > 0 else ""
                    print(
                        f"{self._description} step {step}{total}  loss {loss:.4f}  lr {lr:.2e}{rate}",
                        file=sys.stderr,
                        flush=True,
                    )
            return
        self._pending += 1
        now = time.perf_counter()
        if now - self._last_refresh < REFRESH_S and step < self.total_steps:
            return
        self._last_refresh = now
        rate = f"{samples / seconds:,.0f} samples/s" if seconds > 0 else "-"
        self._progress.update(
            self._task, advance=self._pending, loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=rate, refresh=True
        )
        self._pending = 0

    def log(self, record: dict[str, Any], *, tensorboard: bool = True) -> None:
        """Write one metrics record (JSONL and, with ``tensorboard``, TensorBoard scalars)."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self._jsonl.flush()
        if self._tb is not None and tensorboard:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def print(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            if self._pending:
                self._progress.update(self._task, advance=self._pending)
            self._progress.stop()
            self._progress = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
