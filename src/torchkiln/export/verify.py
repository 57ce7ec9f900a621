"""Check an exported artifact against the eager model: same outputs within a tolerance, at several batch
sizes, or an :class:`ExportVerificationError` naming the format, the output, the errors and the tolerance.

An output passes when every element satisfies ``|artifact - eager| <= atol + rtol * |eager|`` (the rule
of ``torch.allclose``). Reported per output: ``max_abs`` = max ``|artifact - eager|`` and ``max_rel`` =
``max_abs / max|eager|`` (the error relative to the output's scale; elementwise relative errors blow up
near zero and say little).

>>> tolerance("onnx", torch.float32)
(0.0001, 0.001)
>>> [tuple(t.shape) for t in sample_inputs((torch.rand(2, 3),), 5)]
[(5, 3)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from torchkiln.export.spec import ExportError

__all__ = [
    "TOLERANCES",
    "ExportVerificationError",
    "OutputCheck",
    "compare_outputs",
    "sample_inputs",
    "tolerance",
    "verification_batch_sizes",
]

# (atol, rtol) per format for float32 outputs. torch.export's module() runs the same aten kernels as eager
# (errors are usually exactly 0); the others change kernels (oneDNN convolutions in frozen TorchScript,
# ONNX Runtime's MLAS, inductor's fused and reordered reductions), which moves float32 results by ~1e-6
# relative: the bounds leave a wide margin over that and still catch a wrong graph (errors of order 1).
TOLERANCES: dict[str, tuple[float, float]] = {
    "eager": (1e-6, 1e-5),
    "export": (1e-5, 1e-4),
    "torchscript": (1e-4, 1e-3),
    "aoti": (1e-4, 1e-3),
    "onnx": (1e-4, 1e-3),
}
# Half-precision outputs: 8 (bf16) / 11 (fp16) bits of mantissa.
_HALF_TOLERANCE = {torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


class ExportVerificationError(ExportError):
    """An exported artifact's outputs differ from eager PyTorch's by more than the tolerance."""

    def __init__(self, message: str, checks: Sequence[OutputCheck] = ()) -> None:
        super().__init__(message)
        self.checks = list(checks)


@dataclass(frozen=True)
class OutputCheck:
    """One output at one batch size: errors, tolerance, and whether it passed."""

    batch_size: int
    output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        text = (
            f"batch {self.batch_size} {self.output}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
            f"(atol {self.atol:g}, rtol {self.rtol:g}) {status}"
        )
        return text + (f" -- {self.detail}" if self.detail else "")


def tolerance(
    fmt: str, dtype: torch.dtype, overrides: dict[str, float | None] | None = None
) -> tuple[float, float]:
    """``(atol, rtol)`` for outputs of ``dtype`` from format ``fmt``; ``overrides`` (atol/rtol, None =
    default) win. Integer and boolean outputs are compared exactly."""
    if not (dtype.is_floating_point or dtype.is_complex):
        atol, rtol = 0.0, 0.0
    elif dtype in _HALF_TOLERANCE:
        atol, rtol = _HALF_TOLERANCE[dtype]
    else:
        atol, rtol = TOLERANCES.get(fmt, (1e-4, 1e-3))
    overrides = overrides or {}
    if overrides.get("atol") is not None:
        atol = float(overrides["atol"])
    if overrides.get("rtol") is not None:
        rtol = float(overrides["rtol"])
    return atol, rtol


def verification_batch_sizes(example_batch: int) -> list[int]:
    """The example's batch size, batch 1 (the serving case, where shape specialization bites), and an odd
    batch larger than the example's.

    >>> verification_batch_sizes(2), verification_batch_sizes(1)
    ([2, 1, 5], [1, 4])
    """
    sizes = [example_batch, 1, example_batch + 3]
    return list(dict.fromkeys(sizes))


def sample_inputs(
    example: Sequence[torch.Tensor], batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Inputs like ``example`` with ``batch_size`` rows: the example's own rows first, then new rows --
    float rows drawn around the example's values (same mean and spread), integer rows drawn from the range
    the example spans (token ids stay valid ids; 0/1 masks stay 0/1), boolean rows cycled."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        n = t.shape[0]
        if batch_size <= n:
            out.append(t[:batch_size].clone())
            continue
        extra = batch_size - n
        base = t[torch.arange(extra) % n]
        if t.dtype.is_floating_point:
            flat = t.double()
            std = float(flat.std()) if t.numel() > 1 else 1.0
            noise = torch.randn(base.shape, generator=gen, dtype=torch.float64) * (std or 1.0)
            new = (flat.mean() + noise).to(t.dtype)
        elif t.dtype == torch.bool:
            new = base.clone()
        else:
            lo, hi = int(t.min()), int(t.max())
            new = torch.randint(lo, hi + 1, base.shape, generator=gen, dtype=t.dtype)
        out.append(torch.cat([t, new]))
    return tuple(out)


def compare_outputs(
    fmt: str,
    names: Sequence[str],
    got: Sequence[torch.Tensor],
    expected: Sequence[torch.Tensor],
    batch_size: int,
    overrides: dict[str, float | None] | None = None,
) -> list[OutputCheck]:
    """One :class:`OutputCheck` per output (shape and dtype mismatches fail with ``inf`` errors)."""
    if len(got) != len(expected):
        return [
            OutputCheck(
                batch_size,
                "outputs",
                float("inf"),
                float("inf"),
                0.0,
                0.0,
                False,
                f"the artifact returned {len(got)} outputs, eager {len(expected)}",
            )
        ]
    checks = []
    for name, a, e in zip(names, got, expected, strict=True):
        atol, rtol = tolerance(fmt, e.dtype, overrides)
        if tuple(a.shape) != tuple(e.shape):
            checks.append(
                OutputCheck(
                    batch_size,
                    name,
                    float("inf"),
                    float("inf"),
                    atol,
                    rtol,
                    False,
                    f"shape {tuple(a.shape)} vs eager {tuple(e.shape)}",
                )
            )
            continue
        if e.numel() == 0:
            checks.append(OutputCheck(batch_size, name, 0.0, 0.0, atol, rtol, True))
            continue
        a64, e64 = a.detach().to(torch.float64), e.detach().to(torch.float64)
        same = (a64 == e64) | (
            torch.isnan(a64) & torch.isnan(e64)
        )  # equal infinities, NaN where eager has NaN
        diff = torch.where(same, 0.0, (a64 - e64).abs()).nan_to_num(nan=torch.inf)
        finite = torch.isfinite(e64)
        bound = torch.where(finite, atol + rtol * e64.abs(), 0.0)
        max_abs = float(diff.max())
        scale = float(e64[finite].abs().max()) if bool(finite.any()) else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        ok = bool((diff <= bound).all())
        detail = "" if a.dtype == e.dtype else f"dtype {a.dtype} vs eager {e.dtype}"
        checks.append(OutputCheck(batch_size, name, max_abs, max_rel, atol, rtol, ok, detail))
    return checks
