"""Batch samplers the trainer builds for plain datasets: shuffled by (seed, epoch) alone, and able to
start mid-epoch, so resuming from a checkpoint replays exactly the batches an uninterrupted run sees.

>>> s = EpochBatchSampler(10, batch_size=4, shuffle=True, seed=0)
>>> s.set_epoch(1); full = list(s)
>>> s.set_epoch(1); s.skip(1); list(s) == full[1:]
True
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class EpochBatchSampler:
    """Yields lists of indices. The order depends only on ``seed`` and the epoch (not on global RNG)."""

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ):
        if n <= 0:
            raise ValueError("the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = (
            n,
            batch_size,
            shuffle,
            seed,
            drop_last,
        )
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, batches: int) -> None:
        """Start the next iteration ``batches`` batches into the epoch (consumed by one ``__iter__``)."""
        self._skip = batches

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        start, self._skip = self._skip, 0
        for b in range(start, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
