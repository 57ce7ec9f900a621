"""Candidates of the optimizer's search: one frozen config per way to run the model (runtime, precision,
memory format, quantization, pruning ratio), and how to build each into a callable plus a saved artifact.

A candidate that cannot run here raises :class:`CandidateSkipped` saying why (from the variant or
technique requirements); nothing silently falls back to another path.

>>> Candidate().key, Candidate(runtime="compile", precision="bf16").key
('eager', 'compile+bf16')
>>> Candidate(prune=0.5, quant="int8-static").key
'prune0.5+distill+int8-static+eager'
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.errors import KilnError

__all__ = [
    "QUANTS",
    "RUNTIMES",
    "Built",
    "BuildContext",
    "Candidate",
    "CandidateSkipped",
    "build_candidate",
    "generate_candidates",
]

RUNTIMES = ("eager", "compile", "torchscript", "onnxruntime")
QUANTS = ("int8-dynamic", "int8-static", "int8-weight-only")


class CandidateSkipped(KilnError, RuntimeError):
    """This candidate cannot run on this machine / model; the message says why."""


@dataclass(frozen=True)
class Candidate:
    """One way to run the model. ``runtime``: eager PyTorch, ``torch.compile`` with inductor freezing,
    a frozen TorchScript export, or an ONNX Runtime session. ``precision`` ``"bf16"``: autocast around
    the call. ``quant``: int8 dynamic (backend follows the runtime: torchao under compile, legacy
    ``quantize_dynamic`` eagerly, ORT's quantizer under onnxruntime), static PT2E int8, or weight-only
    int8 (torchao, int8 weights and float activations, compiled). ``prune``: the
    channel ratio removed (then a short distillation from the float model) before the rest."""

    runtime: str = "eager"
    precision: str = "fp32"
    channels_last: bool = False
    quant: str | None = None
    prune: float = 0.0

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise KilnError(
                f"Candidate.runtime={self.runtime!r} is not accepted; accepted: {', '.join(RUNTIMES)}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise KilnError(
                f"Candidate.precision={self.precision!r} is not accepted; accepted: 'fp32', 'bf16'"
            )
        if self.quant is not None and self.quant not in QUANTS:
            raise KilnError(
                f"Candidate.quant={self.quant!r} is not accepted; accepted: None, {', '.join(QUANTS)}"
            )
        if not 0.0 <= self.prune < 1.0:
            raise KilnError(f"Candidate.prune must be in [0, 1), got {self.prune!r}")

    @property
    def key(self) -> str:
        """A stable name (used as the cache key and in the table)."""
        parts = []
        if self.prune:
            parts.append(f"prune{self.prune:g}+distill")
        if self.quant:
            parts.append(self.quant)
        parts.append(self.runtime)
        if self.precision == "bf16":
            parts.append("bf16")
        if self.channels_last:
            parts.append("channels_last")
        return "+".join(parts)

    @property
    def parent(self) -> Candidate | None:
        """The candidate this one builds on in a branch (prune r + quant -> prune r), else None."""
        if self.prune and (self.quant or self.runtime != "eager" or self.precision != "fp32"):
            return Candidate(prune=self.prune)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "quant": self.quant,
            "prune": self.prune,
        }


def _has_linear(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in model.modules())


def _is_conv_net(model: nn.Module, example: torch.Tensor) -> bool:
    return example.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def generate_candidates(
    model: nn.Module,
    example: torch.Tensor,
    *,
    compile: bool = True,  # noqa: A002 - mirrors torch.compile
    prune_ratios: Sequence[float] = (0.25, 0.5),
    quantize: bool = True,
) -> list[Candidate]:
    """Every candidate worth trying for ``model`` on ``example`` inputs, baseline (fp32 eager) first.

    Conv nets (a Conv2d and a 4-d input) also get channels_last and static int8; every model gets bf16
    autocast, TorchScript, ONNX Runtime, dynamic int8 and pruning (ratios ascending, so a branch can stop
    once a ratio is over budget). ``compile=False`` leaves out the torch.compile candidates.
    """
    conv = _is_conv_net(model, example)
    out = [Candidate()]
    out += [Candidate(precision="bf16")]
    if conv:
        out += [Candidate(channels_last=True), Candidate(precision="bf16", channels_last=True)]
    out += [Candidate(runtime="torchscript"), Candidate(runtime="onnxruntime")]
    if compile:
        out += [Candidate(runtime="compile"), Candidate(runtime="compile", precision="bf16")]
        if conv:
            out += [Candidate(runtime="compile", precision="bf16", channels_last=True)]
    if quantize:
        out += [Candidate(quant="int8-dynamic", runtime="onnxruntime"), Candidate(quant="int8-dynamic")]
        if compile:
            out += [Candidate(quant="int8-dynamic", runtime="compile")]
            if _has_linear(model):
                out += [Candidate(quant="int8-weight-only", runtime="compile")]
        if conv:
            out += [Candidate(quant="int8-static")]
            if compile:
                out += [Candidate(quant="int8-static", runtime="compile")]
    for ratio in sorted(prune_ratios):
        out.append(Candidate(prune=ratio))
        out.append(Candidate(prune=ratio, runtime="onnxruntime"))
        if compile:
            out.append(Candidate(prune=ratio, runtime="compile"))
        if quantize and conv:
            out.append(Candidate(prune=ratio, quant="int8-static", runtime="compile" if compile else "eager"))
        elif quantize:
            out.append(
                Candidate(prune=ratio, quant="int8-dynamic", runtime="compile" if compile else "onnxruntime")
            )
    return out


# --------------------------------------------------------------------------------------------- building


@dataclass
class BuildContext:
    """What building needs: the float model (eval mode), an input batch at the measured batch size,
    training data (calibration, distillation), a work directory, and the distillation length."""

    model: nn.Module
    example: torch.Tensor
    workdir: Path
    train_data: Any = None
    distill_epochs: int = 2
    distill_max_steps: int | None = None
    lr: float = 1e-3
    measure_s: float | None = None
    pruned: dict[float, nn.Module] = field(default_factory=dict)


@dataclass
class Built:
    """A built candidate: ``run(x)`` for evaluation, ``bind(x)`` a zero-argument callable for timing,
    ``artifact`` the saved file (its size is the candidate's size), ``module`` what was run."""

    run: Callable[[torch.Tensor], Any]
    bind: Callable[[torch.Tensor], Callable[[], Any]]
    artifact: Path
    module: Any
    notes: list[str] = field(default_factory=list)


class Bf16Autocast(nn.Module):
    """``module`` run under ``torch.autocast("cpu", bfloat16)``, outputs cast back to float32: how a bf16
    candidate is exported, so the artifact carries the precision it was measured in."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            return out.float()
        return tuple(o.float() if isinstance(o, torch.Tensor) else o for o in out)


def _plain(fn: Callable[[torch.Tensor], Any], ctx_fn: Callable[[], Any] | None = None) -> tuple[Any, Any]:
    def run(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            if ctx_fn is None:
                return fn(x)
            with ctx_fn():
                return fn(x)

    def bind(x: torch.Tensor) -> Callable[[], Any]:
        return lambda: run(x)

    return run, bind


def _save_state(module: nn.Module, path: Path) -> Path:
    target = getattr(module, "_orig_mod", module)
    torch.save(target.state_dict(), path)
    return path


def _pruned_model(ctx: BuildContext, ratio: float) -> nn.Module:
    """prune ``ratio`` of the channels, then a short distillation from the float model (cached per ratio)."""
    if ratio in ctx.pruned:
        return ctx.pruned[ratio]
    from torchkiln.compress.api import prune
    from torchkiln.compress.distill import Distill, distill
    from torchkiln.compress.prune import ChannelPrune

    if ctx.train_data is None:
        raise CandidateSkipped("pruning needs training data for the distillation fine-tune (none was given)")
    student = copy.deepcopy(ctx.model).train()
    for p in student.parameters():
        p.requires_grad_(True)
    example = ctx.example[:2].clone()
    student = prune(student, ChannelPrune(ratio=ratio), example_inputs=example, calibration=ctx.train_data)
    result = distill(
        student,
        ctx.model,
        ctx.train_data,
        config=Distill(temperature=4.0, alpha=0.9),
        epochs=ctx.distill_epochs,
        max_steps=ctx.distill_max_steps,
        batch_size=32,
        lr=ctx.lr,
        progress="off",
        flops=False,
        seed=0,
    )
    pruned = result.model.eval()
    for p in pruned.parameters():
        p.requires_grad_(False)
    ctx.pruned[ratio] = pruned
    return pruned


def _check_variant(name: str, model: nn.Module, example: torch.Tensor) -> None:
    from torchkiln.measure.variants import VariantUnavailableError, check_variant

    try:
        check_variant(name, "cpu", example)
    except VariantUnavailableError as exc:
        raise CandidateSkipped(str(exc)) from None


def _check_technique(name: str) -> None:
    from torchkiln.compress.registry import check_technique

    missing = check_technique(name)
    if missing:
        raise CandidateSkipped(f"{name} cannot run here: it needs {'; '.join(missing)}")


def _calibration(ctx: BuildContext) -> Any:
    if ctx.train_data is None:
        raise CandidateSkipped("static int8 needs calibration data (training data); none was given")
    from torch.utils.data import DataLoader

    return DataLoader(
        ctx.train_data, batch_size=len(ctx.example), shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def build_candidate(candidate: Candidate, ctx: BuildContext) -> Built:
    """Build ``candidate`` (raises :class:`CandidateSkipped` with the reason where it cannot run)."""
    from torchkiln.compress.quantize import QuantizeError, compile_frozen, run_like, save_quantized

    c = candidate
    x = ctx.example
    path = ctx.workdir / c.key.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    base = _pruned_model(ctx, c.prune) if c.prune else ctx.model
    if c.precision == "bf16":
        _check_variant("bf16", base, x)
        if c.runtime in ("torchscript", "onnxruntime"):
            raise CandidateSkipped(f"bf16 autocast is not applied inside a {c.runtime} artifact")
    if c.channels_last:
        _check_variant("channels_last", base, x)
        if c.runtime in ("torchscript", "onnxruntime"):
            raise CandidateSkipped(
                f"channels_last is applied to eager and compiled PyTorch; a {c.runtime} artifact keeps "
                "its own layout"
            )
    if c.runtime == "compile":
        _check_variant("compile", base, x)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if c.precision == "bf16" else None

    if c.quant is None:
        if c.runtime in ("eager", "compile"):
            module = copy.deepcopy(base) if c.channels_last else base
            if c.channels_last:
                module = module.to(memory_format=torch.channels_last)
            runner = compile_frozen(module) if c.runtime == "compile" else module
            run, bind = _plain(runner, autocast)
            if c.channels_last:
                inner_run, inner_bind = run, bind

                def run(t: torch.Tensor) -> Any:  # noqa: F811 - the converted-input wrapper
                    return inner_run(t.contiguous(memory_format=torch.channels_last))

                def bind(t: torch.Tensor) -> Callable[[], Any]:  # noqa: F811
                    return inner_bind(t.contiguous(memory_format=torch.channels_last))

            return Built(run, bind, _save_state(base, path / "model.pt"), runner)
        import torchkiln.export as export

        fmt = "torchscript" if c.runtime == "torchscript" else "onnx"
        if fmt == "onnx":
            _check_technique("quantize/int8-dynamic")  # same ORT requirements as the ORT quantizer
        try:
            result = export.export(
                base,
                x,
                path / ("model.pt" if fmt == "torchscript" else "model.onnx"),
                format=fmt,
                verbose=False,
            )
        except export.ExportError as exc:
            raise CandidateSkipped(f"{fmt} export failed: {str(exc)[:300]}") from None
        predictor = export.load_predictor(result.path, threads=torch.get_num_threads())
        run, bind = _plain(predictor)
        return Built(run, bind, Path(result.path), predictor)

    from torchkiln.compress.api import quantize
    from torchkiln.compress.quantize import Int8Dynamic, Int8Static, Int8WeightOnly
    from torchkiln.compress.registry import TechniqueUnavailableError

    try:
        if c.quant == "int8-dynamic":
            _check_technique("quantize/int8-dynamic")
            if c.channels_last or c.precision == "bf16":
                raise CandidateSkipped(
                    "dynamic int8 is measured in fp32, contiguous (int8 kernels choose their own)"
                )
            backend = {"compile": "torchao", "eager": "eager", "onnxruntime": "onnxruntime"}.get(c.runtime)
            if backend is None:
                raise CandidateSkipped(
                    f"dynamic int8 has no {c.runtime} backend (torchao, eager, onnxruntime)"
                )
            q = quantize(
                base,
                Int8Dynamic(backend=backend, threads=torch.get_num_threads()),
                example_inputs=x[:2].clone(),
                workdir=path,
            )
        elif c.quant == "int8-weight-only":
            _check_technique("quantize/int8-weight-only")
            if c.runtime != "compile":
                raise CandidateSkipped(
                    "weight-only int8 (torchao) is measured compiled: eagerly its dequantize runs unfused"
                )
            if c.channels_last or c.precision == "bf16":
                raise CandidateSkipped("weight-only int8 is measured in fp32, contiguous")
            q = quantize(base, Int8WeightOnly(), example_inputs=x[:2].clone())
        else:
            _check_technique("quantize/int8-static")
            if c.runtime not in ("eager", "compile"):
                raise CandidateSkipped(f"static int8 (PT2E) runs eagerly or compiled, not under {c.runtime}")
            if c.precision == "bf16" or c.channels_last:
                raise CandidateSkipped(
                    "static int8 is lowered to oneDNN int8 kernels; bf16 / channels_last do not apply"
                )
            q = quantize(base, Int8Static(calibration=_calibration(ctx), num_batches=8), example_inputs=x)
    except (TechniqueUnavailableError, QuantizeError) as exc:
        raise CandidateSkipped(str(exc)) from None
    artifact = save_quantized(
        q,
        path
        / (
            "model.onnx"
            if c.runtime == "onnxruntime"
            else "model.pt2"
            if c.quant == "int8-static"
            else "model.pt"
        ),
    )
    if c.runtime == "compile":
        _, runner = run_like(q, base, mode="compile")
    else:
        runner = q
    run, bind = _plain(runner)
    return Built(run, bind, artifact, q)


def artifact_size(path: str | os.PathLike[str]) -> int:
    """Bytes of an artifact file (or of every file under an artifact directory)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
