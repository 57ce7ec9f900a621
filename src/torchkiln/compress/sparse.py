"""Unstructured magnitude pruning: the smallest weights set to zero, per layer or globally, made permanent,
and gradual pruning on Zhu & Gupta's cubic schedule as a ``fit`` callback.

Zeros in a dense tensor save nothing: the dense ``state_dict`` is as large as before and dense kernels
multiply every zero, so :class:`MagnitudePrune` reports sparsity, never savings. Space is saved only by a
sparse format: :func:`save_sparse` writes every sufficiently sparse weight as CSR (float values, int16/int32
column indices, row pointers: 6 bytes per non-zero with int16 columns against 4 per element dense, so it
pays from about a third of zeros), and :func:`load_sparse` reads it back. Speed needs structured pruning
(:mod:`torchkiln.compress.prune`).

>>> import torch, torchkiln as tk
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> model = tk.prune(model, MagnitudePrune(sparsity=0.75, protect_output=False))
>>> round(sparsity_report(model)["sparsity"], 2)
0.75
>>> round(cubic_sparsity(50, final=0.8, start=0, end=100), 3)   # 0.8 + (0 - 0.8) * (1 - 0.5)^3
0.7
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from torchkiln.compress.registry import register_technique
from torchkiln.errors import KilnError

__all__ = [
    "GradualPruning",
    "MagnitudePrune",
    "cubic_sparsity",
    "load_sparse",
    "magnitude_prune",
    "save_sparse",
    "sparsity_report",
]

SPARSE_FORMAT = "torchkiln-sparse"
_TARGETS = (nn.Linear, nn.modules.conv._ConvNd)


class SparsityError(KilnError, ValueError):
    """An unstructured-pruning config or sparse file that cannot be used."""


@dataclass(frozen=True)
class MagnitudePrune:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of every Linear/Conv (``scope="layer"``)
    or across all of them (``"global"``: layers with small weights lose more). ``ignored``: module-name
    patterns left dense; ``protect_output``: keep the output layer dense (needs ``example_inputs``, else the
    model's ``example_inputs()``)."""

    sparsity: float = 0.5
    scope: str = "layer"
    ignored: tuple[str, ...] = ()
    protect_output: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise SparsityError(f"MagnitudePrune.sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.scope not in ("layer", "global"):
            raise SparsityError(f"MagnitudePrune.scope={self.scope!r}; accepted: 'layer', 'global'")
        object.__setattr__(
            self, "ignored", (self.ignored,) if isinstance(self.ignored, str) else tuple(self.ignored)
        )


def _targets(
    model: nn.Module, ignored: Iterable[str], protect_output: bool, example_inputs: Any
) -> list[tuple[str, nn.Module]]:
    ignored = tuple(ignored)
    protected: set[str] = set()
    if protect_output:
        from torchkiln.compress.prune import _example_inputs, find_output_layers

        try:
            inputs = _example_inputs(model, example_inputs)
        except KilnError:
            raise SparsityError(
                "protect_output=True finds the output layer by tracing: pass example_inputs= (or set "
                "protect_output=False)"
            ) from None
        protected = set(find_output_layers(model, inputs))
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _TARGETS)
        and name not in protected
        and not any(fnmatch.fnmatchcase(name, p) for p in ignored)
    ]


def sparsity_report(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Zeros among the weights of Linear/Conv layers (all, or those named): ``{"sparsity", "zeros", "total",
    "layers": {name: fraction}}``. Masks still attached count through the effective weight."""
    wanted = set(names) if names is not None else None
    zeros = total = 0
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, _TARGETS) or (wanted is not None and name not in wanted):
            continue
        w = m.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        layers[name] = z / max(w.numel(), 1)
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "total": total, "layers": layers}


@register_technique(
    "prune/magnitude",
    MagnitudePrune,
    summary="unstructured magnitude pruning (weights zeroed, permanent); saves space only in a sparse format",
)
def magnitude_prune(model: nn.Module, config: MagnitudePrune, *, example_inputs: Any = None) -> nn.Module:
    """Zero weights by magnitude (``torch.nn.utils.prune``), then remove the masks: the zeros are plain
    weights afterwards, with no hooks or ``_orig``/``_mask`` tensors left."""
    targets = _targets(model, config.ignored, config.protect_output, example_inputs)
    if not targets:
        raise SparsityError("no Linear/Conv layer left to prune (all ignored or protected)")
    if config.scope == "global":
        torch_prune.global_unstructured(
            [(m, "weight") for _, m in targets],
            pruning_method=torch_prune.L1Unstructured,
            amount=config.sparsity,
        )
    else:
        for _, m in targets:
            torch_prune.l1_unstructured(m, "weight", amount=config.sparsity)
    for _, m in targets:
        torch_prune.remove(m, "weight")
    return model


# -------------------------------------------------------------------------------------------- sparse files


def _to_csr(w: torch.Tensor) -> dict[str, Any]:
    import warnings

    flat = w.detach().reshape(w.shape[0], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta": only the conversion is used
        csr = flat.to_sparse_csr()
    col_dtype = torch.int16 if flat.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    row_dtype = torch.int32 if csr.values().numel() <= torch.iinfo(torch.int32).max else torch.int64
    return {
        "shape": list(w.shape),
        "crow": csr.crow_indices().to(row_dtype),
        "col": csr.col_indices().to(col_dtype),
        "values": csr.values().clone(),
    }


def _from_csr(d: Mapping[str, Any]) -> torch.Tensor:
    shape = tuple(d["shape"])
    rows = shape[0]
    cols = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = torch.sparse_csr_tensor(d["crow"].long(), d["col"].long(), d["values"], size=(rows, cols))
        return csr.to_dense().reshape(shape)


def save_sparse(model: nn.Module, path: str | os.PathLike[str], *, min_sparsity: float = 0.34) -> Path:
    """Write ``model``'s state_dict with every weight of at least ``min_sparsity`` zeros in CSR form (below
    that, CSR is larger than dense and the tensor stays dense). Read back with :func:`load_sparse`."""
    from torchkiln.train.checkpoint import atomic_save

    dense: dict[str, torch.Tensor] = {}
    csr: dict[str, dict[str, Any]] = {}
    for key, t in model.state_dict().items():
        if t.ndim >= 2 and t.is_floating_point() and float((t == 0).float().mean()) >= min_sparsity:
            csr[key] = _to_csr(t)
        else:
            dense[key] = t
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": SPARSE_FORMAT, "format_version": 1, "dense": dense, "csr": csr}, target)
    return target


def load_sparse(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a :func:`save_sparse` file into ``model`` (same architecture; ``weights_only=True``)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != SPARSE_FORMAT:
        raise SparsityError(f"{path} is not a torchkiln sparse state_dict (written by save_sparse)")
    state = dict(payload["dense"])
    state.update({k: _from_csr(v) for k, v in payload["csr"].items()})
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------------ gradual


def cubic_sparsity(step: int, *, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` for ``t0 <= t <= t0 +
    n * dt`` (here ``start`` = t0, ``end`` = t0 + n * dt); ``initial`` before ``start``, ``final`` after
    ``end``. Sparsity rises fast at first, while there are many redundant weights, and slowly at the end."""
    if end <= start:
        raise SparsityError(f"cubic_sparsity: end ({end}) must be after start ({start})")
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


class GradualPruning:
    """A ``fit`` callback pruning by magnitude on the cubic schedule, fine-tuning in between.

    Every ``frequency`` optimizer steps from ``start_step`` to ``end_step`` the masks are recomputed to the
    schedule's sparsity (weights already pruned stay pruned: they have the smallest magnitude, zero); the
    masks stay attached while training so pruned weights remain zero; when training ends
    (``on_train_end``, called by ``fit``) they are made permanent. ``scope``: ``"global"`` or ``"layer"``.

    >>> cb = GradualPruning(0.8, start_step=0, end_step=100, frequency=10)
    >>> [round(cb.sparsity_at(s), 3) for s in (0, 10, 50, 100, 200)]
    [0.0, 0.217, 0.7, 0.8, 0.8]
    """

    def __init__(
        self,
        final_sparsity: float,
        *,
        start_step: int = 0,
        end_step: int,
        frequency: int = 10,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        ignored: tuple[str, ...] = (),
        protect_output: bool = True,
        example_inputs: Any = None,
    ) -> None:
        if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
            raise SparsityError(
                f"GradualPruning needs 0 <= initial_sparsity <= final_sparsity < 1, got {initial_sparsity}, "
                f"{final_sparsity}"
            )
        if frequency < 1 or end_step <= start_step:
            raise SparsityError("GradualPruning needs frequency >= 1 and end_step > start_step")
        if scope not in ("layer", "global"):
            raise SparsityError(f"GradualPruning scope={scope!r}; accepted: 'layer', 'global'")
        self.final = final_sparsity
        self.initial = initial_sparsity
        self.start = start_step
        self.frequency = frequency
        # the last pruning step is the last multiple of frequency after start: t0 + n * dt
        self.end = start_step + ((end_step - start_step) // frequency) * frequency
        self.scope = scope
        self.ignored = tuple(ignored)
        self.protect_output = protect_output
        self.example_inputs = example_inputs
        self.history: list[tuple[int, float]] = []
        self._targets: list[tuple[str, nn.Module]] | None = None

    def sparsity_at(self, step: int) -> float:
        """The schedule's sparsity after optimizer step ``step`` (held between pruning steps)."""
        if step < self.start:
            return 0.0
        t = min(step, self.end)
        t = self.start + ((t - self.start) // self.frequency) * self.frequency
        return cubic_sparsity(t, final=self.final, start=self.start, end=self.end, initial=self.initial)

    def __call__(self, record: dict[str, Any]) -> None:
        """Logged records are not needed; pruning happens in :meth:`on_step`."""

    @torch.no_grad()
    def on_step(self, step: int, model: nn.Module) -> None:
        if step < self.start or step > self.end or (step - self.start) % self.frequency:
            return
        if self._targets is None:
            self._targets = _targets(model, self.ignored, self.protect_output, self.example_inputs)
            for _, m in self._targets:
                torch_prune.identity(m, "weight")  # a mask of ones; weight = weight_orig * weight_mask
        target = self.sparsity_at(step)
        mags = [(m.weight_orig * m.weight_mask).abs() for _, m in self._targets]
        if self.scope == "global":
            everything = torch.cat([a.flatten() for a in mags])
            k = int(round(target * everything.numel()))
            threshold = torch.kthvalue(everything, k).values if k > 0 else None
            for (_, m), a in zip(self._targets, mags, strict=True):
                self._set_mask(m, a, threshold, k)
        else:
            for (_, m), a in zip(self._targets, mags, strict=True):
                k = int(round(target * a.numel()))
                self._set_mask(m, a, torch.kthvalue(a.flatten(), k).values if k > 0 else None, k)
        self.history.append((step, target))

    @staticmethod
    def _set_mask(m: nn.Module, magnitude: torch.Tensor, threshold: torch.Tensor | None, k: int) -> None:
        if threshold is None:
            return
        mask = (magnitude > threshold).to(m.weight_mask.dtype)
        m.weight_mask.copy_(mask * m.weight_mask)

    def on_train_end(self, model: nn.Module) -> None:
        """Make the masks permanent (zeros become plain weights; no hooks or ``_orig``/``_mask`` left)."""
        for _, m in self._targets or []:
            if torch_prune.is_pruned(m):
                torch_prune.remove(m, "weight")
        self._targets = None
