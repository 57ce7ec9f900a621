"""Token-budget batch sampler: batches of similar-length samples whose *padded* size fits a budget.

Summing raw lengths (``sum(len) <= max_tokens``) under-counts what a padded batch costs: the model
computes ``batch_size * longest`` tokens. :class:`TokenBudgetSampler` bounds exactly that, sorts samples
by length inside large random buckets so that batches hold similar lengths (little padding), shuffles
batch order, and is deterministic given ``(seed, epoch)``; it resumes mid-epoch (``skip``) and splits
work across ranks with equal batch counts.

>>> s = TokenBudgetSampler([5, 3, 8, 8, 2, 7], max_tokens=16, seed=0)
>>> batches = list(s)
>>> sorted(i for b in batches for i in b)
[0, 1, 2, 3, 4, 5]
>>> all(len(b) * max([5, 3, 8, 8, 2, 7][i] for i in b) <= 16 for b in batches)
True
>>> s.skip(1); list(s) == batches[1:]
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

OVERSIZE_POLICIES = ("error", "truncate", "skip")


class TokenBudgetSampler:
    """Yields lists of dataset indices with ``len(batch) * longest_in_batch <= max_tokens``.

    ``lengths``: the token count of every sample (a sequence of ints or a 1-d tensor/array).

    * ``max_batch_size`` caps the samples per batch; ``multiple_of`` rounds each batch's size down to
      a multiple of it where the batch holds at least ``multiple_of`` samples (the rest goes on to the
      next batch), e.g. 8 for tensor cores.
    * ``shuffle``: indices are shuffled, cut into buckets of ``bucket_size`` samples (default: about
      100 batches' worth), sorted by length inside each bucket and batched greedily; the order of the
      batches is then shuffled. Everything depends only on ``seed`` and the epoch (:meth:`set_epoch`).
      Without ``shuffle`` the buckets are taken in index order and the batch order is kept.
    * ``oversize``: samples longer than ``max_tokens`` raise (``"error"``, naming index and length),
      count as ``max_tokens`` long and go alone in a batch (``"truncate"``: the collate must cut them,
      e.g. ``pad_collate(..., max_len=max_tokens)``), or are left out (``"skip"``). :attr:`report` and
      :attr:`oversize_count` say how many.
    * Distributed (``num_replicas`` > 1): every rank builds the same global batch list and takes
      batches ``rank::num_replicas``, so ranks see disjoint samples. Unequal batch counts would hang
      collectives, so the count is made a multiple of ``num_replicas``: with ``drop_last`` the last
      ``count % num_replicas`` batches are dropped; otherwise the largest batches are split in two
      (every sample still exactly once, ranks still disjoint) and only when no batch has two samples
      left to split are batches from the start of the list repeated (``report["repeated_batches"]``).
    * Resume: :meth:`skip` makes the next iteration start ``n`` batches in (the trainer calls it after
      loading a checkpoint); :meth:`state_dict` also records the position reached, which
      :meth:`load_state_dict` turns back into a skip.
    """

    def __init__(
        self,
        lengths: Sequence[int] | Any,
        max_tokens: int,
        *,
        max_batch_size: int | None = None,
        multiple_of: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: int | None = None,
        oversize: str = "error",
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        elif hasattr(lengths, "tolist"):  # numpy
            lengths = lengths.tolist()
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("TokenBudgetSampler: lengths is empty")
        if max_tokens < 1:
            raise ValueError(f"TokenBudgetSampler: max_tokens must be >= 1, got {max_tokens}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"TokenBudgetSampler: max_batch_size must be >= 1, got {max_batch_size}")
        if multiple_of < 1:
            raise ValueError(f"TokenBudgetSampler: multiple_of must be >= 1, got {multiple_of}")
        if oversize not in OVERSIZE_POLICIES:
            raise ValueError(
                f"TokenBudgetSampler: oversize must be one of {OVERSIZE_POLICIES}, got {oversize!r}"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"TokenBudgetSampler: need 0 <= rank < num_replicas, got {rank=}, {num_replicas=}"
            )
        negative = next((i for i, n in enumerate(self.lengths) if n < 0), None)
        if negative is not None:
            raise ValueError(
                f"TokenBudgetSampler: sample {negative} has negative length {self.lengths[negative]}"
            )
        self.max_tokens = int(max_tokens)
        self.max_batch_size = max_batch_size
        self.multiple_of = int(multiple_of)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.oversize = oversize
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0
        self._position = 0  # batches handed out in the current iteration
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

        over = [i for i, n in enumerate(self.lengths) if n > self.max_tokens]
        if over and oversize == "error":
            shown = ", ".join(f"index {i} (length {self.lengths[i]})" for i in over[:5])
            more = f" and {len(over) - 5} more" if len(over) > 5 else ""
            raise ValueError(
                f"TokenBudgetSampler: {len(over)} sample(s) longer than max_tokens={self.max_tokens}: "
                f"{shown}{more}; raise max_tokens or pass oversize='truncate' or 'skip'"
            )
        skipped = set(over) if oversize == "skip" else set()
        self._eligible = [i for i in range(len(self.lengths)) if i not in skipped]
        if not self._eligible:
            raise ValueError("TokenBudgetSampler: every sample is longer than max_tokens (all skipped)")
        # Lengths as the budget sees them (truncated samples count as max_tokens).
        self._eff = [min(n, self.max_tokens) for n in self.lengths]
        if bucket_size is None:
            mean = max(1.0, sum(self._eff[i] for i in self._eligible) / len(self._eligible))
            per_batch = max(1, int(self.max_tokens // mean))
            if max_batch_size is not None:
                per_batch = min(per_batch, max_batch_size)
            bucket_size = 100 * per_batch
        if bucket_size < 1:
            raise ValueError(f"TokenBudgetSampler: bucket_size must be >= 1, got {bucket_size}")
        self.bucket_size = int(bucket_size)
        self.oversize_count = len(over)
        self.report: dict[str, Any] = {
            "samples": len(self.lengths),
            "oversize": len(over),
            "oversize_policy": oversize,
            "skipped": len(skipped),
            "truncated": len(over) if oversize == "truncate" else 0,
            "oversize_indices": over[:100],
        }

    # ------------------------------------------------------------------------------------ epochs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, batches: int) -> None:
        """Start the next iteration ``batches`` batches into the epoch (consumed by one ``__iter__``)."""
        if batches < 0:
            raise ValueError(f"skip needs batches >= 0, got {batches}")
        self._skip = int(batches)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self._skip = int(state.get("position", 0))

    # ------------------------------------------------------------------------------------ batches

    def _batch_bucket(self, bucket: list[int]) -> list[list[int]]:
        """Greedy batches over ``bucket`` sorted by length (ascending: the last index is the longest)."""
        eff, budget, cap, mult = self._eff, self.max_tokens, self.max_batch_size, self.multiple_of
        bucket = sorted(bucket, key=eff.__getitem__)  # stable: ties keep the shuffled order
        out: list[list[int]] = []
        i, n = 0, len(bucket)
        while i < n:
            k = 1
            limit = n - i if cap is None else min(cap, n - i)
            while k < limit and (k + 1) * max(1, eff[bucket[i + k]]) <= budget:
                k += 1
            if k >= mult:
                k -= k % mult
            out.append(bucket[i : i + k])
            i += k
        return out

    def global_batches(self) -> list[list[int]]:
        """Every batch of the current epoch, all ranks together (before the split across ranks)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(len(self._eligible), generator=g).tolist()
            order = [self._eligible[p] for p in perm]
        else:
            g, order = None, list(self._eligible)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.bucket_size):
            batches.extend(self._batch_bucket(order[start : start + self.bucket_size]))
        if g is not None:
            batches = [batches[p] for p in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        key = (self.seed, self.epoch)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        batches = self.global_batches()
        world = self.num_replicas
        repeated = split = 0
        if world > 1 and len(batches) % world:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % world]
            else:
                need = (-len(batches)) % world
                batches = list(batches)
                while need:  # split the largest batch in two (first of the largest: deterministic)
                    j = max(range(len(batches)), key=lambda m: (len(batches[m]), -m))
                    b = batches[j]
                    if len(b) < 2:
                        break
                    batches[j : j + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
                    split += 1
                    need -= 1
                need = (-len(batches)) % world
                if need:  # only single-sample batches left: repeat some from the start
                    batches = batches + [list(b) for b in (batches * need)[:need]]
                    repeated = need
        if not batches:
            raise ValueError(
                f"TokenBudgetSampler: fewer batches than num_replicas={world} with drop_last=True"
            )
        self.report.update({"split_batches": split, "repeated_batches": repeated})
        mine = batches[self.rank :: world]
        self._cache = (key, mine)
        return mine

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the count can change from epoch to epoch)."""
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._skip = self._skip, 0
        self._position = start  # set now, not at the first next(): state_dict() right after iter() is exact
        return self._generate(batches, start)

    def _generate(self, batches: list[list[int]], start: int) -> Iterator[list[int]]:
        for b in batches[start:]:
            self._position += 1
            yield list(b)

    # ------------------------------------------------------------------------------------ stats

    def padding_efficiency(self) -> float:
        """Real tokens / tokens computed (``len * longest`` per batch) over this rank's epoch."""
        real = computed = 0
        for b in self._rank_batches():
            lens = [self._eff[i] for i in b]
            real += sum(lens)
            computed += len(lens) * max(lens)
        return real / computed if computed else 1.0


def padding_efficiency(
    batches: Sequence[Sequence[int]], lengths: Sequence[int], max_len: int | None = None
) -> float:
    """Real tokens / tokens computed when each batch is padded to its longest (capped at ``max_len``).

    >>> round(padding_efficiency([[0, 1], [2]], [2, 4, 3]), 4)   # (2 + 4 + 3) / (2 * 4 + 3)
    0.8182
    """
    real = computed = 0
    for b in batches:
        lens = [lengths[i] if max_len is None else min(lengths[i], max_len) for i in b]
        if lens:
            real += sum(lens)
            computed += len(lens) * max(lens)
    return real / computed if computed else 1.0
