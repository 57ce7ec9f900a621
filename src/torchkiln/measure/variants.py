"""Inference variants: how a model is run when it is benchmarked (fp32 eager, bf16/fp16 autocast,
channels_last, torch.compile), each a small frozen config registered by name.

A variant says what it needs (``cuda``, ``bf16`` hardware, ``compile``, a ``4d-input``) and
:func:`apply_variant` fails with a :class:`VariantUnavailableError` that says so where it is missing --
it never falls back silently to something slower while reporting the fast path. Names compose with
``+`` (``"channels_last+bf16"``, ``"channels_last+compile"``): memory-format changes first, then
autocast, and ``torch.compile`` last.

Every variant runs the model under ``torch.inference_mode()`` (torch.compile works under it on torch
2.13; a :class:`Compile` config may ask for ``grad_mode="no_grad"`` instead) and never changes the
model it is given: channels_last converts a copy, compile wraps.

>>> import torch
>>> list_variants()
['bf16', 'channels_last', 'compile', 'compile-max-autotune', 'fp16', 'fp32']
>>> run = apply_variant("fp32", torch.nn.Linear(4, 2))
>>> run(torch.ones(3, 4)).shape, torch.is_inference(run(torch.ones(3, 4)))
(torch.Size([3, 2]), True)
>>> get_variant("bf16").needs
('bf16',)
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import platform
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchkiln.errors import KilnError
from torchkiln.measure.env import _cpuinfo, cpu_flags, cpu_model_name

__all__ = [
    "REQUIREMENTS",
    "Autocast",
    "ChannelsLast",
    "Compile",
    "Eager",
    "PreparedVariant",
    "VariantError",
    "VariantSpec",
    "VariantUnavailableError",
    "apply_variant",
    "check_variant",
    "cpu_bf16_supported",
    "describe_variants",
    "get_variant",
    "list_variants",
    "model_device",
    "register_variant",
    "split_inputs",
]


class VariantError(KilnError, ValueError):
    """An unknown variant name, or variants that cannot be combined."""


class VariantUnavailableError(KilnError, RuntimeError):
    """A variant needs something this machine, device or input does not have."""


# ------------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class Eager:
    """Run the model as it is (fp32 eager) under ``torch.inference_mode()``."""


@dataclass(frozen=True)
class Autocast:
    """``torch.autocast`` to ``dtype`` ("bf16" or "fp16") around each call."""

    dtype: Literal["bf16", "fp16"] = "bf16"


@dataclass(frozen=True)
class ChannelsLast:
    """A copy of the model in ``torch.channels_last`` and every 4-d input converted to it (once, outside
    the timed call, as a pipeline that produces channels_last tensors would)."""


@dataclass(frozen=True)
class Compile:
    """``torch.compile(model, mode=mode, dynamic=dynamic)``: static shapes by default, so each batch size
    gets its own kernels (like with like); the first call per shape compiles."""

    mode: str = "default"
    dynamic: bool | None = False
    grad_mode: Literal["inference", "no_grad"] = "inference"


VariantConfig = Eager | Autocast | ChannelsLast | Compile

# What a requirement means, for error messages and `kiln bench --help`.
REQUIREMENTS: dict[str, str] = {
    "cuda": "a CUDA device (the model and inputs on cuda)",
    "bf16": "native bfloat16 (CPU: avx512_bf16 or amx_bf16 on x86, bf16 on Arm; GPU: Ampere or newer)",
    "compile": "torch.compile (TorchDynamo) and, on CPU, a C++ compiler for inductor",
    "4d-input": "at least one 4-d (N, C, H, W) input tensor",
}


@dataclass(frozen=True)
class VariantSpec:
    """A registered variant: its name, config parts (applied in order), requirements and description."""

    name: str
    parts: tuple[VariantConfig, ...]
    needs: tuple[str, ...] = ()
    description: str = ""


_REGISTRY: dict[str, VariantSpec] = {}


def register_variant(
    name: str,
    config: VariantConfig | tuple[VariantConfig, ...],
    *,
    needs: tuple[str, ...] = (),
    description: str = "",
) -> VariantSpec:
    """Register ``config`` (one config or a tuple applied in order) under ``name``; returns the spec.

    >>> spec = register_variant("bf16-cl", (ChannelsLast(), Autocast("bf16")), needs=("bf16", "4d-input"))
    >>> get_variant("bf16-cl").parts
    (ChannelsLast(), Autocast(dtype='bf16'))
    >>> _unregister("bf16-cl")
    """
    if "+" in name or not name.strip():
        raise VariantError(f"variant name {name!r} must be non-empty and must not contain '+'")
    unknown = [n for n in needs if n not in REQUIREMENTS]
    if unknown:
        raise VariantError(
            f"variant {name!r}: unknown requirement(s) {unknown}; accepted: {', '.join(REQUIREMENTS)}"
        )
    parts = config if isinstance(config, tuple) else (config,)
    spec = VariantSpec(name, parts, tuple(needs), description)
    _REGISTRY[name] = spec
    return spec


def _unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


register_variant("fp32", Eager(), description="eager fp32 under torch.inference_mode (the usual baseline)")
register_variant("bf16", Autocast("bf16"), needs=("bf16",), description="torch.autocast to bfloat16")
register_variant(
    "fp16", Autocast("fp16"), needs=("cuda",), description="torch.autocast to float16 (CUDA only)"
)
register_variant(
    "channels_last", ChannelsLast(), needs=("4d-input",), description="model and 4-d inputs in channels_last"
)
register_variant("compile", Compile("default"), needs=("compile",), description="torch.compile, default mode")
register_variant(
    "compile-max-autotune",
    Compile("max-autotune"),
    needs=("compile",),
    description="torch.compile mode='max-autotune' (long compile: tries kernel configurations)",
)


def list_variants(pattern: str = "*") -> list[str]:
    """Sorted names of registered variants matching the fnmatch ``pattern`` (compose them with ``+``).

    >>> list_variants("compile*")
    ['compile', 'compile-max-autotune']
    """
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def describe_variants() -> list[dict[str, Any]]:
    """``[{"name", "needs", "description"}]`` for every registered variant, sorted by name."""
    return [
        {"name": n, "needs": list(_REGISTRY[n].needs), "description": _REGISTRY[n].description}
        for n in list_variants()
    ]


def get_variant(name: str) -> VariantSpec:
    """The spec of a registered name or a ``+`` composition of them (``"channels_last+bf16"``).

    >>> get_variant("fp23")
    Traceback (most recent call last):
    ...
    torchkiln.measure.variants.VariantError: unknown variant 'fp23'; known variants: bf16, channels_last, \
compile, compile-max-autotune, fp16, fp32 (combine them with '+', e.g. channels_last+bf16)
    """
    if not isinstance(name, str):
        raise VariantError(f"a variant is given by name, got {type(name).__name__}")
    pieces = [p.strip() for p in name.split("+")]
    specs = []
    for piece in pieces:
        if piece not in _REGISTRY:
            raise VariantError(
                f"unknown variant {piece!r}{f' in {name!r}' if len(pieces) > 1 else ''}; known variants: "
                f"{', '.join(list_variants())} (combine them with '+', e.g. channels_last+bf16)"
            )
        specs.append(_REGISTRY[piece])
    if len(specs) == 1:
        return specs[0]
    parts = tuple(p for s in specs for p in s.parts if not isinstance(p, Eager))
    for kind in (Autocast, Compile, ChannelsLast):
        if sum(isinstance(p, kind) for p in parts) > 1:
            raise VariantError(f"variant {name!r} combines more than one {kind.__name__} part; use one")
    # Memory format first, then autocast, compile last (it must see the converted model).
    order = {ChannelsLast: 0, Autocast: 1, Compile: 2}
    parts = tuple(sorted(parts, key=lambda p: order[type(p)])) or (Eager(),)
    needs = tuple(dict.fromkeys(n for s in specs for n in s.needs))
    return VariantSpec("+".join(pieces), parts, needs, " + ".join(s.description for s in specs))


# ------------------------------------------------------------------------------------------- requirements


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (avx512_bf16 / amx_bf16 on x86, bf16 on Arm).

    Without it oneDNN emulates bf16 and autocast is usually slower than fp32, so the ``bf16`` variant
    refuses to run rather than report an emulated path as the fast one.
    """
    flags = cpu_flags()
    if flags.get("avx512_bf16") or flags.get("amx_bf16"):
        return True
    return "bf16" in _cpuinfo().get("Features", "").split()


def _cuda_bf16_supported() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def _cxx_compiler() -> str | None:
    try:
        from torch._inductor import config as inductor_config

        candidates = [c for c in inductor_config.cpp.cxx if c]
    except Exception:
        candidates = []
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else [*candidates, "g++", "clang++", "c++"]
    return next((c for c in candidates if shutil.which(c)), None)


def _missing(need: str, device: torch.device, inputs: Any) -> str | None:
    """Why ``need`` is not met on ``device`` with ``inputs`` (None when it is)."""
    if need == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA only, and this benchmark runs on {device.type}"
        if not torch.cuda.is_available():
            return "it runs on CUDA only, and no CUDA device is available"
        return None
    if need == "bf16":
        if device.type == "cuda":
            return (
                None
                if _cuda_bf16_supported()
                else "this GPU has no native bfloat16 support (needs Ampere or newer)"
            )
        if device.type == "cpu":
            if cpu_bf16_supported():
                return None
            return (
                f"this CPU ({cpu_model_name()}, {platform.machine()}) has no native bfloat16 support "
                "(avx512_bf16 or amx_bf16 on x86, bf16 on Arm), so bf16 autocast would run emulated and "
                "usually slower than fp32"
            )
        return f"bf16 support on {device.type} is not known to torchkiln"
    if need == "compile":
        try:
            from torch import _dynamo

            if not _dynamo.is_dynamo_supported():
                return "torch.compile (TorchDynamo) is not supported on this Python/platform"
        except Exception as exc:  # a broken install
            return f"torch.compile is not usable here ({type(exc).__name__}: {exc})"
        if device.type == "cpu" and _cxx_compiler() is None:
            return (
                "inductor needs a C++ compiler on CPU (g++ or clang++ on PATH, or $CXX), and none was found"
            )
        return None
    if need == "4d-input":
        if inputs is None:
            return None  # checked when inputs are prepared
        shapes = _tensor_shapes(inputs)
        if any(len(s) == 4 for s in shapes):
            return None
        return f"it needs a 4-d (N, C, H, W) input tensor; the inputs have shapes {shapes or 'none'}"
    raise VariantError(f"unknown requirement {need!r}; accepted: {', '.join(REQUIREMENTS)}")


def check_variant(
    variant: str | VariantSpec, device: str | torch.device = "cpu", inputs: Any = None
) -> VariantSpec:
    """Raise :class:`VariantUnavailableError` when ``variant`` cannot run on ``device`` with ``inputs``
    (inputs None: the input requirements are checked later); return its spec.

    >>> check_variant("fp16", "cpu")
    Traceback (most recent call last):
    ...
    torchkiln.measure.variants.VariantUnavailableError: variant 'fp16' cannot run: it runs on CUDA only, \
and this benchmark runs on cpu
    """
    spec = variant if isinstance(variant, VariantSpec) else get_variant(variant)
    dev = torch.device(device)
    for need in spec.needs:
        why = _missing(need, dev, inputs)
        if why is not None:
            raise VariantUnavailableError(f"variant {spec.name!r} cannot run: {why}")
    return spec


# ---------------------------------------------------------------------------------------------- inputs


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``: a tensor is one argument, a tuple/list are the
    positional arguments, a mapping the keyword arguments.

    >>> args, kwargs = split_inputs({"x": 1})
    >>> args, kwargs
    ((), {'x': 1})
    """
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _tensor_shapes(obj: Any) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    _map_tensors(obj, lambda t: (shapes.append(tuple(t.shape)), t)[1])
    return shapes


# ---------------------------------------------------------------------------------------------- applying


@dataclass
class PreparedVariant:
    """A model ready to run one variant: ``prepare_inputs`` once per input, then call ``run(inputs)`` (or
    ``bind(inputs)()``) as often as needed."""

    spec: VariantSpec
    model: nn.Module
    device: torch.device
    input_transforms: list[Callable[[Any], Any]] = field(default_factory=list)
    contexts: list[Callable[[], contextlib.AbstractContextManager]] = field(default_factory=list)
    grad_mode: Literal["inference", "no_grad"] = "inference"

    @property
    def name(self) -> str:
        return self.spec.name

    def prepare_inputs(self, inputs: Any) -> Any:
        """Move ``inputs`` to the device and apply the variant's input transforms (e.g. channels_last)."""
        out = _map_tensors(inputs, lambda t: t.to(self.device))
        for transform in self.input_transforms:
            out = transform(out)
        return out

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode() if self.grad_mode == "inference" else torch.no_grad())
            for ctx in self.contexts:
                stack.enter_context(ctx())
            yield

    def bind(self, prepared_inputs: Any) -> Callable[[], Any]:
        """A zero-argument callable running the model on already prepared inputs (what gets timed)."""
        args, kwargs = split_inputs(prepared_inputs)
        model, context = self.model, self.context

        def call() -> Any:
            with context():
                return model(*args, **kwargs)

        return call

    def __call__(self, inputs: Any) -> Any:
        return self.bind(self.prepare_inputs(inputs))()


def _apply_eager(config: Eager, prepared: PreparedVariant, owned: list[bool]) -> None:
    pass


def _apply_autocast(config: Autocast, prepared: PreparedVariant, owned: list[bool]) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.dtype)
    if dtype is None:
        raise VariantError(f"Autocast dtype {config.dtype!r} is not accepted; use 'bf16' or 'fp16'")
    device_type = prepared.device.type
    prepared.contexts.append(lambda: torch.autocast(device_type, dtype=dtype))


def _apply_channels_last(config: ChannelsLast, prepared: PreparedVariant, owned: list[bool]) -> None:
    if not owned[0]:  # never convert the caller's model in place
        prepared.model = copy.deepcopy(prepared.model)
        owned[0] = True
    prepared.model = prepared.model.to(memory_format=torch.channels_last)
    name = prepared.spec.name

    def to_channels_last(inputs: Any) -> Any:
        shapes = _tensor_shapes(inputs)
        if not any(len(s) == 4 for s in shapes):
            raise VariantUnavailableError(
                f"variant {name!r} cannot run: it needs a 4-d (N, C, H, W) input tensor; the inputs have "
                f"shapes {shapes or 'none'}"
            )
        return _map_tensors(
            inputs, lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
        )

    prepared.input_transforms.append(to_channels_last)


def _apply_compile(config: Compile, prepared: PreparedVariant, owned: list[bool]) -> None:
    prepared.model = torch.compile(prepared.model, mode=config.mode, dynamic=config.dynamic)
    prepared.grad_mode = config.grad_mode


_HANDLERS: dict[type, Callable[[Any, PreparedVariant, list[bool]], None]] = {
    Eager: _apply_eager,
    Autocast: _apply_autocast,
    ChannelsLast: _apply_channels_last,
    Compile: _apply_compile,
}


def apply_variant(
    variant: str | VariantSpec,
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    example_inputs: Any = None,
) -> PreparedVariant:
    """Check ``variant``'s requirements and prepare ``model`` to run it; ``model`` itself is not changed
    (put it in eval mode first if that is what you want measured).

    ``device`` defaults to the device of the model's first parameter (cpu for a model without any).
    ``example_inputs`` lets input requirements (channels_last's 4-d input) fail here rather than at the
    first call.

    >>> apply_variant("channels_last", torch.nn.Linear(4, 2), example_inputs=torch.ones(3, 4))
    Traceback (most recent call last):
    ...
    torchkiln.measure.variants.VariantUnavailableError: variant 'channels_last' cannot run: it needs a 4-d \
(N, C, H, W) input tensor; the inputs have shapes [(3, 4)]
    """
    dev = torch.device(device) if device is not None else model_device(model)
    spec = check_variant(variant, dev, example_inputs)
    prepared = PreparedVariant(spec=spec, model=model, device=dev)
    owned = [False]
    for part in spec.parts:
        handler = _HANDLERS.get(type(part))
        if handler is None:
            raise VariantError(
                f"variant {spec.name!r}: no handler for config {type(part).__name__}; "
                f"accepted: {', '.join(t.__name__ for t in _HANDLERS)}"
            )
        handler(part, prepared, owned)
    return prepared


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu when it has neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
