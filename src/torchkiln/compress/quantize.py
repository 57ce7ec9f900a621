"""Quantization that runs real int8 kernels: dynamic int8 (torchao, eager ``quantize_dynamic``, ONNX
Runtime), static post-training int8 (PT2E with ``X86InductorQuantizer``, lowered to oneDNN int8 kernels),
weight-only int8, and quantization-aware training; layer selection by name patterns; artifacts whose size
is the real (int8) size.

``tk.quantize(model, config, ...)`` returns a *new* quantized model (the float model is left as it was)
carrying ``model.kiln_quant`` (technique, backend, the layers quantized, how it is meant to run):

==================  ================  ======================================================  ===========
config              backend           what runs                                               run it
==================  ================  ======================================================  ===========
``Int8Dynamic``     ``torchao``       ``quantize_`` + Int8DynamicActivationInt8WeightConfig   compiled
                                      (per-token activation scales, per-channel weights)      (freezing)
``Int8Dynamic``     ``eager``         ``torch.ao.quantization.quantize_dynamic`` (x86 /       eager
                                      fbgemm; Linear and LSTM), while torch still ships it
``Int8Dynamic``     ``onnxruntime``   dynamo ONNX export, ORT ``quantize_dynamic``            ORT session
                                      (per-channel int8 weights), fixed-thread session
``Int8Static``      PT2E              ``prepare_pt2e`` (X86InductorQuantizer, conv-BN         eager or
                                      folded), calibration, ``convert_pt2e``, lowered         compiled
                                      to oneDNN int8 kernels
``Int8WeightOnly``  ``torchao``       Int8WeightOnlyConfig (int8 weights, float activations)  compiled
``Int8QAT``         torchao QAT       fake-quantized Linear to train, then int8 dynamic       compiled
==================  ================  ======================================================  ===========

A backend that cannot run here raises :class:`~torchkiln.compress.registry.TechniqueUnavailableError`
saying why; nothing falls back to another backend.

Layer selection (every config): ``include`` / ``exclude`` are ``fnmatch`` patterns on module names
(``"blocks.*.mlp.*"``), ``filter_fn(module, name)`` decides last; ``keep_first_last=True`` keeps the first
convolution (the stem) and the last Linear (classifier / LM head) in float, the usual convention.

>>> import torch, torchkiln as tk
>>> model = tk.create_model("mlp", hidden=(32, 32))
>>> select_layers(model, Int8Dynamic())
['body.0.0', 'body.1.0']
>>> select_layers(model, Int8Dynamic(exclude=("body.1.*",), keep_first_last=False))
['body.0.0', 'head']
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkiln.compress.registry import TechniqueUnavailableError, register_technique
from torchkiln.errors import KilnError

__all__ = [
    "DYNAMIC_BACKENDS",
    "Int4Linear",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8QAT",
    "Int8Static",
    "Int8WeightOnly",
    "QuantizeError",
    "FrozenCompiled",
    "compile_frozen",
    "compile_options",
    "convert_qat",
    "int8_weight_fraction",
    "load_quantized",
    "lower_x86",
    "model_inputs",
    "prepare_qat",
    "quant_info",
    "run_like",
    "save_quantized",
    "select_layers",
]

DYNAMIC_BACKENDS = ("torchao", "eager", "onnxruntime")
GRANULARITIES = ("per_token", "per_tensor")
OBSERVERS = ("histogram", "minmax", "moving_average")
LOWERINGS = ("x86", "inductor", "reference")
FORMAT = "torchkiln-quantized"

#: inductor options a quantized model is compiled with (and its float original, to compare like with like):
#: freezing turns the weights into constants so the int8 patterns (qconv/qlinear with fused requantize)
#: are matched and the weights pre-packed for oneDNN.
COMPILE_OPTIONS: dict[str, Any] = {"freezing": True}


class QuantizeError(KilnError, ValueError):
    """A quantization config, model or input that cannot be used, with what would be accepted."""


def compile_options() -> dict[str, Any]:
    """The inductor settings quantized models are compiled with; compile the float model with the same."""
    return dict(COMPILE_OPTIONS)


class FrozenCompiled(nn.Module):
    """``torch.compile(module)`` called under ``torch._inductor.config.patch(**options)`` (default
    :func:`compile_options`: freezing on).

    Inductor compiles lazily at the first call (and again on a recompile), and ``freezing`` is read from
    the global config then -- ``torch.compile(options={"freezing": True})`` does not reach the freezing
    passes -- so every call runs inside the patch; nothing process-wide is left changed.
    """

    def __init__(self, module: nn.Module, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.compiled = torch.compile(module)
        self.options = dict(compile_options() if options is None else options)

    @property
    def _orig_mod(self) -> nn.Module:
        return self.compiled._orig_mod

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(**self.options):
            return self.compiled(*args, **kwargs)


def compile_frozen(module: nn.Module, options: dict[str, Any] | None = None) -> FrozenCompiled:
    """``torch.compile`` with inductor freezing on (see :class:`FrozenCompiled`)."""
    return FrozenCompiled(module, options)


# ------------------------------------------------------------------------------------------------ configs


def _check_choice(where: str, name: str, value: Any, accepted: Iterable[str]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise QuantizeError(
            f"{where}: {name}={value!r} is not accepted; accepted: {', '.join(map(repr, accepted))}"
        )


def _check_patterns(where: str, name: str, value: Any) -> None:
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise QuantizeError(
            f"{where}: {name} must be a tuple of fnmatch patterns such as ('blocks.*',), got {value!r}"
        )


@dataclass(frozen=True)
class Int8Dynamic:
    """Dynamic int8: int8 weights (per output channel) and activations quantized on the fly at run time.

    ``backend``: ``"torchao"`` (run under ``torch.compile``), ``"eager"`` (legacy ``quantize_dynamic``,
    fast in eager mode at small batch; quantizes ``nn.LSTM`` too) or ``"onnxruntime"`` (needs
    ``example_inputs=``; ``threads`` sets ORT's intra-op threads). ``granularity`` of the activation scales
    (torchao only): ``"per_token"`` (one scale per row; survives activation outliers) or ``"per_tensor"``.
    The eager and ONNX Runtime backends use one scale per input tensor (recorded as ``"per_tensor"``), so a
    sample's outputs can move slightly with the other samples in its batch.
    """

    backend: Literal["torchao", "eager", "onnxruntime"] = "torchao"
    granularity: Literal["per_token", "per_tensor"] = "per_token"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    keep_first_last: bool = True
    threads: int = 1
    lstm: bool = True

    def __post_init__(self) -> None:
        _check_choice("Int8Dynamic", "backend", self.backend, DYNAMIC_BACKENDS)
        _check_choice("Int8Dynamic", "granularity", self.granularity, GRANULARITIES)
        _check_patterns("Int8Dynamic", "include", self.include)
        _check_patterns("Int8Dynamic", "exclude", self.exclude)
        if self.granularity != "per_token" and self.backend != "torchao":
            raise QuantizeError(
                f"Int8Dynamic: granularity={self.granularity!r} applies to backend 'torchao' only "
                f"({self.backend!r} chooses its own activation scales)"
            )
        if int(self.threads) < 1:
            raise QuantizeError(f"Int8Dynamic: threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class Int8Static:
    """Static post-training int8 through PT2E: ``torch.export`` -> ``prepare_pt2e`` (X86InductorQuantizer;
    conv-BN folded) -> ``num_batches`` batches of ``calibration`` data in eval mode -> ``convert_pt2e``.

    ``calibration``: an iterable of batches (a DataLoader; ``(inputs..., target)`` tuples have the target
    dropped) or a list of input tuples. ``observer`` of activation ranges: ``"histogram"`` (the x86
    default, clips outliers), ``"minmax"`` or ``"moving_average"``. ``lower``: ``"x86"`` (torchao's
    ``lower_pt2e_quantized_to_x86``: oneDNN int8 conv/linear kernels, runs eagerly and compiles further),
    ``"inductor"`` (returned compiled with ``compile_options()``) or ``"reference"`` (quantize/dequantize
    around float ops: exact int8 numerics, slow; for analysis).
    """

    calibration: Any = None
    num_batches: int = 16
    observer: Literal["histogram", "minmax", "moving_average"] = "histogram"
    per_channel: bool = True
    lower: Literal["x86", "inductor", "reference"] = "x86"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    keep_first_last: bool = True

    def __post_init__(self) -> None:
        _check_choice("Int8Static", "observer", self.observer, OBSERVERS)
        _check_choice("Int8Static", "lower", self.lower, LOWERINGS)
        _check_patterns("Int8Static", "include", self.include)
        _check_patterns("Int8Static", "exclude", self.exclude)
        if int(self.num_batches) < 1:
            raise QuantizeError(f"Int8Static: num_batches must be >= 1, got {self.num_batches}")


@dataclass(frozen=True)
class Int8WeightOnly:
    """Weight-only int8 (torchao ``Int8WeightOnlyConfig``): int8 weights per output channel, float
    activations; for memory-bound small-batch inference. Run it under ``torch.compile``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    keep_first_last: bool = True

    def __post_init__(self) -> None:
        _check_patterns("Int8WeightOnly", "include", self.include)
        _check_patterns("Int8WeightOnly", "exclude", self.exclude)


@dataclass(frozen=True)
class Int8QAT:
    """Quantization-aware training for dynamic int8: ``prepare`` swaps the selected Linear layers for
    torchao ``FakeQuantizedLinear`` (int8 per-token activations, int8 per-channel weights), you train,
    ``convert`` swaps them back and applies ``Int8DynamicActivationInt8WeightConfig`` (real int8).

    ``tk.quantize(model, Int8QAT(step="prepare"))`` then ``tk.quantize(model, Int8QAT(step="convert"))``,
    or :func:`prepare_qat` / :func:`convert_qat`.
    """

    step: Literal["prepare", "convert"] = "prepare"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    keep_first_last: bool = True

    def __post_init__(self) -> None:
        _check_choice("Int8QAT", "step", self.step, ("prepare", "convert"))
        _check_patterns("Int8QAT", "include", self.include)
        _check_patterns("Int8QAT", "exclude", self.exclude)


# ------------------------------------------------------------------------------------------------ layers

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _kinds(config: Any) -> tuple[type, ...]:
    if isinstance(config, Int8Static):
        return (nn.Linear, *_CONVS)
    if isinstance(config, Int8Dynamic) and config.backend == "eager" and config.lstm:
        return (nn.Linear, nn.LSTM)
    return (nn.Linear,)


def _first_last(model: nn.Module) -> set[str]:
    """The stem conv (first convolution) and the classifier / LM head (last Linear) in module order."""
    convs = [n for n, m in model.named_modules() if isinstance(m, _CONVS)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {x for x in (convs[:1] + linears[-1:])}


def select_layers(model: nn.Module, config: Any) -> list[str]:
    """Names of the layers ``config`` quantizes in ``model`` (module order).

    Candidates are the layer kinds the technique handles (Linear; convolutions for ``Int8Static``; LSTM
    for the eager backend). ``include`` patterns (if any) must match, ``exclude`` patterns must not,
    ``keep_first_last`` removes the stem conv and last Linear, ``filter_fn(module, name)`` decides last.
    A pattern that matches no candidate is an error naming the candidates.
    """
    kinds = _kinds(config)
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]
    names = [n for n, _ in candidates]
    where = type(config).__name__
    for attr in ("include", "exclude"):
        for pattern in getattr(config, attr):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
                raise QuantizeError(
                    f"{where}: {attr} pattern {pattern!r} matches no quantizable layer "
                    f"({'/'.join(k.__name__ for k in kinds)}); layers: {shown or 'none'}"
                )
    kept = _first_last(model) if config.keep_first_last else set()
    out = []
    for name, module in candidates:
        if config.include and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        if name in kept:
            continue
        if config.filter_fn is not None and not config.filter_fn(module, name):
            continue
        out.append(name)
    return out


def _no_layers(model: nn.Module, config: Any) -> QuantizeError:
    kinds = "/".join(k.__name__ for k in _kinds(config))
    return QuantizeError(
        f"{type(config).__name__}: no layer selected for quantization ({kinds} layers of "
        f"{type(model).__name__}, after include/exclude/keep_first_last/filter_fn); "
        "widen include, drop exclude, or pass keep_first_last=False"
    )


def _set_info(model: Any, **info: Any) -> Any:
    object.__setattr__(model, "kiln_quant", info) if not isinstance(model, nn.Module) else setattr(
        model, "kiln_quant", info
    )
    return model


def quant_info(model: Any) -> dict[str, Any]:
    """What :func:`~torchkiln.compress.api.quantize` recorded on a quantized model (empty if none)."""
    target = getattr(model, "_orig_mod", model)
    return dict(getattr(target, "kiln_quant", None) or getattr(model, "kiln_quant", None) or {})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _example_inputs(model: nn.Module, example_inputs: Any, where: str) -> Any:
    if example_inputs is not None:
        return example_inputs
    fn = getattr(model, "example_inputs", None)
    if callable(fn):
        return fn(2)
    raise QuantizeError(
        f"{where} needs example_inputs= (a tensor, a tuple of positional inputs or a dict of keyword "
        "inputs); "
        f"{type(model).__name__} has no example_inputs(batch_size) method to make them"
    )


def _call(fn: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


def _as_args(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    if isinstance(inputs, Mapping):
        raise QuantizeError(
            "Int8Static: keyword (dict) inputs are not supported by torch.export here; pass a tuple"
        )
    return (inputs,)


def model_inputs(batch: Any) -> Any:
    """The model inputs of a data batch: a tensor as is, ``(inputs..., target)`` without the target, a dict
    without its target keys (``labels``, ``y``...)."""
    from torchkiln.train.loss import TARGET_KEYS

    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if isinstance(batch, (tuple, list)):
        return tuple(batch[:-1]) if len(batch) > 1 else tuple(batch)
    return (batch,)


# ------------------------------------------------------------------------------------------------ dynamic


def _torchao_int8_config(granularity: str, symmetric: bool = True) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, PerRow, PerTensor

    act = PerRow() if granularity == "per_token" else PerTensor()
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    # set_inductor_config=False: no process-wide inductor flags behind the caller's back (the float
    # model compiled for comparison would otherwise compile differently).
    return Int8DynamicActivationInt8WeightConfig(
        granularity=[act, PerRow()], act_mapping_type=mapping, set_inductor_config=False
    )


def _filter(selected: Iterable[str]) -> Callable[[nn.Module, str], bool]:
    chosen = set(selected)
    return lambda module, fqn: fqn in chosen


def _eager_dynamic(model: nn.Module, selected: list[str]) -> nn.Module:
    try:
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # torch removed the legacy eager quantization
        raise TechniqueUnavailableError(
            f"Int8Dynamic(backend='eager') needs torch.ao.quantization.quantize_dynamic, which this torch "
            f"{torch.__version__} no longer ships; use backend='torchao' or 'onnxruntime'"
        ) from exc
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm", "qnnpack") if e in engines), None)
    if engine is None:
        raise TechniqueUnavailableError(
            "Int8Dynamic(backend='eager') needs a quantized engine (x86/fbgemm/qnnpack); "
            f"this torch has {engines}"
        )
    torch.backends.quantized.engine = engine
    with _quiet():
        return quantize_dynamic(
            model, {name: default_dynamic_qconfig for name in selected}, dtype=torch.qint8
        )


@register_technique(
    "quantize/int8-dynamic",
    Int8Dynamic,
    needs=("torchao",),
    summary="dynamic int8 (torchao under torch.compile, eager quantize_dynamic, or ONNX Runtime)",
)
def int8_dynamic(
    model: nn.Module,
    config: Int8Dynamic,
    *,
    example_inputs: Any = None,
    workdir: str | os.PathLike[str] | None = None,
    inplace: bool = False,
    **_: Any,
) -> Any:
    """Apply :class:`Int8Dynamic`; returns the quantized model (a copy unless ``inplace``).

    The onnxruntime backend needs ``example_inputs`` (or a model with ``example_inputs()``) and writes its
    ``.onnx`` files in ``workdir`` (a temporary directory if None).
    """
    selected = select_layers(model, config)
    if not selected:
        raise _no_layers(model, config)
    backend = config.backend
    if backend == "onnxruntime":
        from torchkiln.compress.registry import REQUIREMENTS

        missing = [r for r in (REQUIREMENTS[k]() for k in ("onnx", "onnxruntime", "onnxscript")) if r]
        if missing:
            raise TechniqueUnavailableError(
                f"Int8Dynamic(backend='onnxruntime') cannot run here: it needs {'; '.join(missing)}"
            )
        from torchkiln.compress._onnx import build_onnxruntime_int8

        inputs = _example_inputs(model, example_inputs, "Int8Dynamic(backend='onnxruntime')")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                q, details = build_onnxruntime_int8(
                    model,
                    inputs,
                    quantize_layers=selected,
                    threads=config.threads,
                    per_channel=True,
                    workdir=workdir,
                )
        finally:
            model.train(was_training)
        return _set_info(
            q,
            technique="quantize/int8-dynamic",
            backend=backend,
            layers=selected,
            mode="onnxruntime",
            threads=config.threads,
            artifact=str(q.path),
            **{k: v for k, v in details.items() if k != "int8_onnx"},
        )
    q = model if inplace else copy.deepcopy(model)
    q.eval()
    if backend == "eager":
        q = _eager_dynamic(q, selected)
        mode = "eager"
    else:
        from torchao.quantization import quantize_

        with _quiet():
            quantize_(q, _torchao_int8_config(config.granularity), filter_fn=_filter(selected))
        mode = "compile"
    return _set_info(
        q,
        technique="quantize/int8-dynamic",
        backend=backend,
        # quantize_dynamic computes one activation scale per input tensor, whatever the config says
        granularity=config.granularity if backend == "torchao" else "per_tensor",
        layers=selected,
        mode=mode,
        compile_options=compile_options() if mode == "compile" else None,
    )


@register_technique(
    "quantize/int8-weight-only",
    Int8WeightOnly,
    needs=("torchao",),
    summary="weight-only int8 (torchao Int8WeightOnlyConfig) for small-batch, memory-bound inference",
)
def int8_weight_only(
    model: nn.Module, config: Int8WeightOnly, *, inplace: bool = False, **_: Any
) -> nn.Module:
    """Apply :class:`Int8WeightOnly` (a copy unless ``inplace``)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    selected = select_layers(model, config)
    if not selected:
        raise _no_layers(model, config)
    q = model if inplace else copy.deepcopy(model)
    q.eval()
    with _quiet():
        quantize_(q, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=_filter(selected))
    return _set_info(
        q,
        technique="quantize/int8-weight-only",
        backend="torchao",
        layers=selected,
        mode="compile",
        compile_options=compile_options(),
    )


# ------------------------------------------------------------------------------------------------ int4


@dataclass(frozen=True)
class Int4WeightOnly:
    """Weight-only int4 (asymmetric, one scale and offset per ``group_size`` inputs of each output row) on
    ATen's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``): 8x smaller Linear weights. Layers whose input
    width is not a multiple of ``group_size`` stay float. Measure before relying on it for speed: in this
    torch build the CPU kernel is slower than an fp32 GEMV at batch 1 (see ``kiln quantize`` output)."""

    group_size: int = 32
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    keep_first_last: bool = True

    def __post_init__(self) -> None:
        _check_choice("Int4WeightOnly", "group_size", self.group_size, (32, 64, 128, 256))
        _check_patterns("Int4WeightOnly", "include", self.include)
        _check_patterns("Int4WeightOnly", "exclude", self.exclude)


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as packed uint4 (two per byte) plus per-group scale/offset."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.reshape(n, k // group_size, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = (
            torch.round((groups - lo[..., None]) / scale[..., None])
            .clamp(0, 15)
            .to(torch.int32)
            .reshape(n, k)
        )
        # the kernel computes w = (q - 8) * scale + zero, so zero = lo + 8 * scale
        zero = lo + 8 * scale
        out = cls(k, n, group_size, linear.bias is not None)
        out.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        out.scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        if linear.bias is not None:
            out.bias = linear.bias.detach().float().clone()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros.to(x2.dtype)
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
        )


def _int4_available() -> str | None:
    ops = torch.ops.aten
    if not (
        hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    ):
        return f"this torch {torch.__version__} has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)"
    return None


@register_technique(
    "quantize/int4-weight-only",
    Int4WeightOnly,
    needs=("x86",),
    summary="weight-only int4 (groupwise, ATen CPU int4 kernel): 8x smaller Linear weights",
)
def int4_weight_only(
    model: nn.Module, config: Int4WeightOnly, *, inplace: bool = False, **_: Any
) -> nn.Module:
    """Apply :class:`Int4WeightOnly` (a copy unless ``inplace``)."""
    reason = _int4_available()
    if reason:
        raise TechniqueUnavailableError(f"Int4WeightOnly cannot run here: {reason}")
    q = model if inplace else copy.deepcopy(model)
    q.eval()
    selected = [
        n for n in select_layers(q, config) if q.get_submodule(n).in_features % config.group_size == 0
    ]
    if not selected:
        raise _no_layers(q, config)
    for name in selected:
        parent_name, _, child = name.rpartition(".")
        parent = q.get_submodule(parent_name) if parent_name else q
        setattr(parent, child, Int4Linear.from_linear(q.get_submodule(name), config.group_size))
    return _set_info(
        q, technique="quantize/int4-weight-only", backend="aten-cpu", layers=selected, mode="eager"
    )


# ------------------------------------------------------------------------------------------------ QAT


def _qat_fake_configs() -> tuple[Any, Any]:
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    # torchao fake-quantizes per-token activations asymmetrically only; convert matches that.
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    return act, weight


@register_technique(
    "quantize/int8-qat",
    Int8QAT,
    needs=("torchao",),
    summary="quantization-aware training (torchao QATConfig): prepare, train with fit, convert to int8",
)
def int8_qat(model: nn.Module, config: Int8QAT, *, inplace: bool = False, **_: Any) -> nn.Module:
    """Apply one step of :class:`Int8QAT` (a copy unless ``inplace``)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    q = model if inplace else copy.deepcopy(model)
    if config.step == "prepare":
        selected = select_layers(q, config)
        if not selected:
            raise _no_layers(q, config)
        act, weight = _qat_fake_configs()
        with _quiet():
            quantize_(
                q,
                QATConfig(activation_config=act, weight_config=weight, step="prepare"),
                filter_fn=_filter(selected),
            )
        return _set_info(q, technique="quantize/int8-qat", step="prepare", layers=selected, mode="train")
    fake = [n for n, m in q.named_modules() if isinstance(m, FakeQuantizedLinear)]
    if not fake:
        raise QuantizeError(
            "Int8QAT(step='convert'): the model has no fake-quantized layers; run Int8QAT(step='prepare') "
            "and train it first"
        )
    q.eval()
    with _quiet():
        # Swap FakeQuantizedLinear back to nn.Linear (trained weights), then real int8 on those layers.
        quantize_(q, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
        quantize_(q, _torchao_int8_config("per_token", symmetric=False), filter_fn=_filter(fake))
    return _set_info(
        q,
        technique="quantize/int8-qat",
        step="convert",
        backend="torchao",
        layers=fake,
        mode="compile",
        compile_options=compile_options(),
    )


def prepare_qat(model: nn.Module, config: Int8QAT | None = None) -> nn.Module:
    """Fake-quantize ``model`` for training (in place); train it, then :func:`convert_qat`."""
    config = dataclasses.replace(config or Int8QAT(), step="prepare")
    return int8_qat(model, config, inplace=True)


def convert_qat(model: nn.Module) -> nn.Module:
    """Convert a model prepared by :func:`prepare_qat` and trained into real int8 (in place)."""
    return int8_qat(model, Int8QAT(step="convert"), inplace=True)


# ------------------------------------------------------------------------------------------------ static


def _calibration_batches(config: Int8Static, example_inputs: Any) -> list[tuple[Any, ...]]:
    data = config.calibration
    if data is None:
        raise QuantizeError(
            "Int8Static needs calibration data: Int8Static(calibration=loader) with a DataLoader or a list "
            "of "
            "input batches representative of what the model will see"
        )
    if isinstance(data, torch.Tensor):
        data = [data]
    batches = []
    try:
        iterator = iter(data)
    except TypeError:
        raise QuantizeError(
            "Int8Static: calibration must be an iterable of batches (a DataLoader or a list), "
            f"got {type(data).__name__}"
        ) from None
    for batch in iterator:
        batches.append(_as_args(model_inputs(batch) if not isinstance(batch, torch.Tensor) else batch))
        if len(batches) >= config.num_batches:
            break
    if not batches:
        raise QuantizeError("Int8Static: the calibration data yielded no batch")
    return batches


def _x86_quantizer(config: Int8Static, model: nn.Module, selected: list[str]) -> Any:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

    qconfig = xiq.get_default_x86_inductor_quantization_config()
    observer = {
        "histogram": HistogramObserver,
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
    }[config.observer]
    act = dataclasses.replace(
        qconfig.input_activation, observer_or_fake_quant_ctr=observer.with_args(eps=2**-12)
    )
    weight = qconfig.weight
    if not config.per_channel:
        from torchao.quantization.pt2e import MinMaxObserver as WeightObserver

        weight = dataclasses.replace(
            weight,
            qscheme=torch.per_tensor_symmetric,
            ch_axis=None,
            observer_or_fake_quant_ctr=WeightObserver.with_args(
                eps=2**-12, qscheme=torch.per_tensor_symmetric, dtype=torch.int8
            ),
        )
    qconfig = dataclasses.replace(qconfig, input_activation=act, output_activation=act, weight=weight)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(qconfig)
    chosen = set(selected)
    for name, module in model.named_modules():
        if name and isinstance(module, _kinds(config)) and name not in chosen:
            quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> int:
    """convert_pt2e leaves the float originals of folded/quantized weights on the module: drop every
    parameter/buffer no ``get_attr`` node reads, so the saved artifact holds int8 weights only."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        dropped += 1
    gm.delete_all_unused_submodules()
    return dropped


def _batch_dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.ndim >= 1 else None for a in args)


def _export(model: nn.Module, args: tuple[Any, ...], dynamic: bool = True) -> tuple[Any, bool]:
    if dynamic:
        try:
            return torch.export.export(model, args, dynamic_shapes=_batch_dims(args)), True
        except Exception:  # noqa: S110 - a model whose batch size is baked in: export at the example's shapes
            pass
    return torch.export.export(model, args), False


def lower_x86(converted: torch.fx.GraphModule, args: tuple[Any, ...], dynamic: bool = True) -> Any:
    """torchao's ``lower_pt2e_quantized_to_x86`` with a dynamic batch dimension: re-export the converted
    graph, run inductor's freezing passes (quantize/dequantize + conv/linear patterns become oneDNN int8
    ``qconv``/``qlinear`` with pre-packed weights) and constant folding. The result runs eagerly."""
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    decomp = torch.export.default_decompositions()
    for op in list(decomp.keys()):
        if not torch._export.utils._is_cia_op(op):
            del decomp[op]
    with _quiet(), torch.no_grad():
        program, dynamic = _export(converted, args, dynamic)
        lowered = program.run_decompositions(decomp).module()
        graph = lowered.graph
        for node in list(graph.nodes):  # aten.t -> permute, as torchao's lowering does
            if node.target == torch.ops.aten.t.default:
                with graph.inserting_before(node):
                    perm = graph.call_function(torch.ops.aten.permute.default, args=(node.args[0], [1, 0]))
                node.replace_all_uses_with(perm)
                graph.erase_node(node)
        graph.lint()
        lowered.recompile()
        freezing_passes(lowered, args)
        constant_fold(lowered)
    return _allow_eval(lowered)


def _allow_eval(gm: Any) -> Any:
    """Let ``.eval()`` / ``.train()`` be called on an exported graph (they raise by default; the graph has
    no train/eval behaviour left, so making them no-ops is exact)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    return allow_exported_model_train_eval(gm)


@register_technique(
    "quantize/int8-static",
    Int8Static,
    needs=("torchao", "x86", "quantized-engine"),
    summary="static int8 PT2E (X86InductorQuantizer, calibration, conv-BN folding) lowered to oneDNN int8",
)
def int8_static(model: nn.Module, config: Int8Static, *, example_inputs: Any = None, **_: Any) -> Any:
    """Apply :class:`Int8Static`; returns a ``GraphModule`` (``lower="x86"``/``"reference"``) or a compiled
    module (``lower="inductor"``). The float model is not modified."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    selected = select_layers(model, config)
    if not selected:
        raise _no_layers(model, config)
    batches = _calibration_batches(config, example_inputs)
    args = _as_args(example_inputs) if example_inputs is not None else batches[0]
    float_model = copy.deepcopy(model).eval()
    with _quiet():
        exported, dynamic = _export(float_model, args)
        prepared = prepare_pt2e(exported.module(), _x86_quantizer(config, float_model, selected))
        with torch.no_grad():
            used = 0
            for batch in batches:
                if not dynamic and any(
                    isinstance(b, torch.Tensor) and b.shape != a.shape
                    for a, b in zip(args, batch, strict=False)
                ):
                    continue
                prepared(*batch)
                used += 1
        converted = convert_pt2e(prepared)
    _drop_unused_attributes(converted)
    _allow_eval(converted)
    info = dict(
        technique="quantize/int8-static",
        backend="pt2e-x86",
        layers=selected,
        calibration_batches=used,
        observer=config.observer,
        lower=config.lower,
        example_inputs=args,
    )
    if config.lower == "reference":
        return _set_info(converted, mode="eager", converted=converted, **info)
    if config.lower == "x86":
        lowered = lower_x86(copy.deepcopy(converted), args, dynamic)
        return _set_info(
            lowered, mode="eager", converted=converted, compile_options=compile_options(), **info
        )
    compiled = compile_frozen(converted)
    _set_info(converted, mode="compile", converted=converted, compile_options=compile_options(), **info)
    return compiled


# ------------------------------------------------------------------------------------------------ inspect


def int8_weight_fraction(model: Any) -> float:
    """Fraction of the weight elements of ``model``'s Linear/conv/LSTM layers (or graph constants) stored as
    int8: torchao ``Int8Tensor`` data, packed eager quantized weights, int8 constants of a PT2E graph.

    >>> int8_weight_fraction(torch.nn.Linear(4, 4))
    0.0
    """
    target = getattr(model, "_orig_mod", model)
    if hasattr(target, "path") and str(getattr(target, "path", "")).endswith(".onnx"):
        import onnx

        inits = onnx.load(str(target.path)).graph.initializer
        sizes = {i.name: (i.data_type, int(torch.tensor(list(i.dims) or [1]).prod())) for i in inits}
        int8 = sum(n for t, n in sizes.values() if t in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
        flt = sum(n for t, n in sizes.values() if t == onnx.TensorProto.FLOAT)
        return int8 / max(1, int8 + flt)
    int8 = total = 0
    for module in target.modules():
        for _, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            inner = getattr(t, "qdata", None)
            if isinstance(inner, torch.Tensor):
                int8 += inner.numel() if inner.dtype in (torch.int8, torch.uint8) else 0
                total += inner.numel()
            elif t.dtype in (torch.int8, torch.uint8):
                int8 += t.numel()
                total += t.numel()
            elif t.dtype.is_floating_point and t.ndim >= 2:
                total += t.numel()
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            for w in _eager_quantized_weights(module):
                int8 += w.numel()
                total += w.numel()
    return int8 / total if total else 0.0


def _eager_quantized_weights(module: nn.Module) -> list[torch.Tensor]:
    """The int8 weights of a legacy eager quantized module (dynamic Linear or LSTM)."""
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, nn.Module):
        w = weight()
        return [w] if isinstance(w, torch.Tensor) and w.is_quantized else []
    out = []
    for value in getattr(module, "_all_weight_values", []):
        for t in value.param.__getstate__()[0][1]:
            if isinstance(t, torch.Tensor) and t.is_quantized:
                out.append(t)
    return out


def run_like(model: Any, float_model: nn.Module, mode: str | None = None) -> tuple[Any, Any]:
    """``(run_float, run_quantized)`` set up the same way, for a like-with-like comparison.

    ``mode`` ``"compile"``: both through ``torch.compile`` with :func:`compile_options` (freezing); a
    static int8 model is compiled from its converted PT2E graph (inductor lowers the quantize/dequantize
    patterns to oneDNN int8 itself; the eagerly-lowered graph holds mutating oneDNN ops inductor does not
    take). ``"eager"``: both as they are. Default: how the quantized model is meant to run (``kiln_quant
    ["mode"]``); an ONNX Runtime model always runs in its session, its float original eagerly.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    info = quant_info(model)
    mode = mode or info.get("mode", "eager")
    if mode not in ("eager", "compile", "onnxruntime", "train"):
        raise QuantizeError(f"run_like: mode must be 'eager' or 'compile', got {mode!r}")
    if mode != "compile" or info.get("backend") == "onnxruntime":
        return float_model, model
    options = info.get("compile_options") or compile_options()
    if isinstance(model, (OptimizedModule, FrozenCompiled)):
        run_q = model
    elif info.get("technique") == "quantize/int8-static":
        run_q = compile_frozen(info["converted"], options)
    else:
        run_q = compile_frozen(model, options)
    return compile_frozen(float_model, options), run_q


# ------------------------------------------------------------------------------------------------ saving


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in info.items():
        if key in ("converted", "example_inputs"):
            continue
        try:
            json.dumps(value)
        except TypeError:
            value = repr(value)
        out[key] = value
    return out


def save_quantized(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write a quantized model's artifact and return its path; its file size is the real size.

    PT2E models: ``torch.export.save`` of the converted graph (``.pt2``; int8 weight constants). ONNX
    Runtime models: the quantized ``.onnx``. torchao / eager models: ``torch.save`` of
    ``{"format", "info", "state_dict"}`` (int8 tensors). A sidecar ``<path>.json`` holds the metadata.
    """
    info = quant_info(model)
    if not info:
        raise QuantizeError(
            f"save_quantized: {type(model).__name__} was not made by tk.quantize (no kiln_quant record); "
            "quantize it first"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    technique = info.get("technique")
    if info.get("backend") == "onnxruntime":
        from torchkiln.compress._onnx import copy_artifact

        copy_artifact(info["artifact"], path)
    elif technique == "quantize/int8-static":
        converted = info["converted"]
        # Two samples are enough as the program's example inputs (they are stored in the file).
        args = tuple(
            a[:2].clone() if isinstance(a, torch.Tensor) and a.ndim >= 1 else a
            for a in info["example_inputs"]
        )
        with _quiet():
            program, _ = _export(converted, args)
        torch.export.save(program, str(path))
    else:
        target = getattr(model, "_orig_mod", model)
        state = target.state_dict()
        torch.save({"format": FORMAT, "info": _jsonable(info), "state_dict": state}, path)
    Path(str(path) + ".json").write_text(json.dumps({"format": FORMAT, **_jsonable(info)}, indent=2))
    return path


def load_quantized(path: str | os.PathLike[str], model: nn.Module | None = None, config: Any = None) -> Any:
    """Load what :func:`save_quantized` wrote.

    ``.pt2`` (static int8): the converted graph, lowered to oneDNN int8 again (needs no model). ``.onnx``:
    an :class:`~torchkiln.compress._onnx.OnnxRuntimeModule`. A torch.save artifact (torchao / eager): pass
    the float ``model`` (same architecture) and the ``config`` it was quantized with; it is quantized again
    and the saved int8 weights are loaded into it.
    """
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"load_quantized: {path} does not exist")
    sidecar = Path(str(path) + ".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if path.suffix == ".onnx":
        from torchkiln.compress._onnx import OnnxRuntimeModule

        module = OnnxRuntimeModule(path, threads=int(meta.get("threads", 1)))
        return _set_info(module, **{**meta, "artifact": str(path)})
    if path.suffix == ".pt2":
        with _quiet():
            program = torch.export.load(str(path))
        converted = _allow_eval(program.module())
        lower = meta.get("lower", "x86")
        if lower == "reference":
            return _set_info(converted, **meta, converted=converted)
        args = tuple(program.example_inputs[0]) if program.example_inputs else None
        if args is None:
            raise QuantizeError(f"load_quantized: {path} has no example inputs to lower the graph with")
        lowered = lower_x86(copy.deepcopy(converted), args)
        return _set_info(lowered, **meta, converted=converted, example_inputs=args)
    if model is None or config is None:
        raise QuantizeError(
            f"load_quantized: {path} holds int8 weights only; pass model= (the float architecture) and "
            "config= "
            f"(the {meta.get('technique', 'quantize')} config it was made with)"
        )
    from torchkiln.compress.api import quantize

    with _quiet():
        blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise QuantizeError(f"load_quantized: {path} is not a torchkiln quantized artifact")
    q = quantize(model, config)
    target = getattr(q, "_orig_mod", q)
    target.load_state_dict(blob["state_dict"], assign=True)
    return q
