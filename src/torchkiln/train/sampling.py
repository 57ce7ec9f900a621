"""Batch samplers the trainer builds for plain datasets: shuffled by (seed, epoch) alone, and able to
start mid-epoch, so resuming from a checkpoint replays exactly the batches an uninterrupted run sees.

>>> s = EpochBatchSampler(10, batch_size=4, shuffle=True, seed=0)
>>> s.set_epoch(1); full = list(s)
>>> s.set_epoch(1); s.skip(1); list(s) == full[1:]
True

Across ranks (``num_replicas`` > 1) each global batch of ``batch_size * num_replicas`` samples is cut
into one contiguous piece per rank, so rank r's j-th batch is its part of the j-th global batch (what a
single process with the global batch size sees), and every rank gets the same number of batches:

>>> [list(EpochBatchSampler(5, 2, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
[[[0, 1], [4]], [[2, 3], [0]]]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class EpochBatchSampler:
    """Yields lists of indices. The order depends only on ``seed`` and the epoch (not on global RNG)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"EpochBatchSampler: need 0 <= rank < num_replicas, got {rank=}, {num_replicas=}"
            )
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
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip = 0
        if num_replicas > 1 and drop_last and n < batch_size * num_replicas:
            raise ValueError(
                f"EpochBatchSampler: {n} samples make no global batch of {batch_size} x {num_replicas} "
                "ranks with drop_last=True"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, batches: int) -> None:
        """Start the next iteration ``batches`` batches into the epoch (consumed by one ``__iter__``)."""
        self._skip = batches

    def __len__(self) -> int:
        size = self.batch_size * self.num_replicas  # the global batch
        return self.n // size if self.drop_last else -(-self.n // size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        start, self._skip = self._skip, 0
        if self.num_replicas == 1:
            for b in range(start, len(self)):
                yield order[b * self.batch_size : (b + 1) * self.batch_size]
            return
        world, size = self.num_replicas, self.batch_size * self.num_replicas
        for b in range(start, len(self)):
            chunk = order[b * size : (b + 1) * size]
            if len(chunk) < world:  # a last global batch smaller than the world: repeat a few samples
                chunk = chunk + order[: world - len(chunk)]
            # Even parts (sizes differ by at most one): every rank runs forward and backward each step.
            q, r = divmod(len(chunk), world)
            lo = self.rank * q + min(self.rank, r)
            yield chunk[lo : lo + q + (1 if self.rank < r else 0)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
