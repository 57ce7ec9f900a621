"""The step machinery that :func:`~torchkiln.measure.profile` and
:func:`~torchkiln.measure.memory_analysis` share: inputs, loss, precision, a model left as found,
forward hooks around every submodule, and the profiler's memory events.

Private: the public entry points document what they do with these pieces.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchkiln.errors import KilnError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT_LABEL = "(root)"  # how the model itself is named in module tables (its qualified name is "")

# Kineto device types whose [memory] events belong to host memory or to a GPU allocator.
_HOST_TYPES = frozenset({"CPU", "MKLDNN", "IDEEP"})
_DEVICE_TYPES = frozenset({"CUDA", "HIP", "XPU", "PrivateUse1"})


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)``: a tensor is one argument, a tuple/list the arguments, a mapping the keywords."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def batch_size_of(inputs: Any) -> int | None:
    """The leading dimension of the first tensor with one, or None."""
    args, kwargs = split_inputs(inputs)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    return None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_precision(precision: str, where: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise KilnError(f"{where}: unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the precision's dtype (no loss scaling: nothing here steps on the loss)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def resolve_loss(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None, where: str) -> torch.Tensor:
    """``loss_fn(output)``, else the loss the model returned (a scalar, ``.loss`` or ``["loss"]``).

    Logits are never turned into a loss against made-up targets: that would profile a loss the user
    does not train with.
    """
    if loss_fn is not None:
        loss = loss_fn(output)
    elif isinstance(output, torch.Tensor) and output.ndim == 0:
        loss = output
    else:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if loss is None:
            shape = f" of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else ""
            raise KilnError(
                f"{where}: a training step needs a loss, and the model returned {type(output).__name__}"
                f"{shape}; pass loss_fn=lambda output: ... (e.g. cross-entropy against the batch's "
                "targets), or use a model that returns a scalar loss, an object with .loss or a dict "
                "with 'loss'"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise KilnError(
            f"{where}: the loss must be a tensor with one element, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    return loss.reshape(())


def default_optimizer(model: nn.Module, where: str) -> torch.optim.Optimizer:
    """``SGD(lr=0)`` over the trainable parameters: a real optimizer step that moves no weight."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise KilnError(f"{where}: mode='train' needs trainable parameters; every parameter is frozen")
    return torch.optim.SGD(params, lr=0.0)


def _cpu_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_cpu_copy(v) for v in value)
    return value


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


@contextlib.contextmanager
def preserved_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Run a block that trains ``model`` and leave model and optimizer exactly as they were.

    Saved on entry, restored on exit: every parameter's and buffer's values (copied into the same
    tensors, so optimizers and tied weights keep pointing at them), each parameter's ``.grad`` (the very
    tensor or None), each submodule's train/eval flag, the optimizer's state dict, and the global RNG
    (forked, so dropout draws do not advance it). The copies live in host memory, so they do not show in
    a CUDA allocator's figures. Inside the block every ``.grad`` starts as None (as after
    ``zero_grad(set_to_none=True)``).
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [(t, _cpu_copy(t)) for _, t in model.named_parameters()]
    saved += [(t, _cpu_copy(t)) for _, t in model.named_buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    opt_state = None
    if optimizer is not None:
        state_dict = optimizer.state_dict()
        opt_state = {
            "state": _cpu_copy(state_dict["state"]),  # load_state_dict moves it back to the params' device
            "param_groups": copy.deepcopy(state_dict["param_groups"]),
        }
    with torch.random.fork_rng(devices=_cuda_devices()):
        for p, _ in grads:
            p.grad = None
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, saved_value in saved:
                    tensor.copy_(saved_value)
            for p, grad in grads:
                p.grad = grad
            if optimizer is not None:
                optimizer.load_state_dict(opt_state)
            for m, mode in modes:
                m.training = mode


@contextlib.contextmanager
def module_hooks(
    model: nn.Module, enter: Callable[[str, nn.Module], None], leave: Callable[[str, nn.Module], None]
) -> Iterator[None]:
    """Call ``enter(name, module)`` before and ``leave(name, module)`` after every submodule's forward.

    Forward pre-hooks and forward hooks (``always_call=True``, so ``leave`` runs even when forward
    raises) on every module from ``named_modules()``; the model itself is named ``""``. Removed on exit.
    """
    handles = []

    def make(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        def pre(module: nn.Module, args: Any) -> None:
            enter(name, module)

        def post(module: nn.Module, args: Any, output: Any) -> None:
            leave(name, module)

        return pre, post

    try:
        for name, module in model.named_modules():
            pre, post = make(name)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def module_ranges(model: nn.Module, prefix: str = "module::") -> Iterator[dict[str, str]]:
    """A ``torch.profiler.record_function`` range named ``<prefix><qualified name>`` around every
    submodule's forward (the model itself is ``(root)``). Yields ``{range name: module class name}``.

    Ranges are opened in a forward pre-hook and closed in a forward hook; they nest as the calls do.
    A module's backward runs inside the autograd engine, outside any forward hook, so module ranges
    cover forward time only.

    >>> from torch.profiler import profile
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> with module_ranges(net) as types, profile() as prof:
    ...     _ = net(torch.randn(2, 4))
    >>> sorted(a.key for a in prof.key_averages() if a.key.startswith("module::"))
    ['module::(root)', 'module::0', 'module::1']
    >>> types["module::1"]
    'ReLU'
    """
    from torch.autograd.profiler import record_function

    open_ranges: list[Any] = []
    types = {f"{prefix}{name or ROOT_LABEL}": type(m).__name__ for name, m in model.named_modules()}

    def enter(name: str, module: nn.Module) -> None:
        rf = record_function(f"{prefix}{name or ROOT_LABEL}")
        rf.__enter__()
        open_ranges.append(rf)

    def leave(name: str, module: nn.Module) -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    try:
        with module_hooks(model, enter, leave):
            yield types
    finally:
        while open_ranges:  # a forward that raised before its hooks could close the range
            open_ranges.pop().__exit__(None, None, None)


def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among the tensors found in ``tensors`` (nested lists/dicts)."""
    from torchkiln.measure.memory import _storage_key_and_bytes

    seen: dict[Any, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            key, nbytes = _storage_key_and_bytes(value)
            seen.setdefault(key, nbytes)
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(tensors)
    return sum(seen.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, inputs: Any) -> int:
    """Bytes held before a step starts: parameters, buffers, gradients, optimizer state and the inputs
    (distinct storages, so tied weights count once)."""
    tensors: list[Any] = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [state for state in optimizer.state.values()]
    tensors.append(inputs)
    return storage_bytes(tensors)


# ------------------------------------------------------------------------------------------------ profiler


def kineto_events(prof: Any) -> list[Any]:
    """The raw events of a finished ``torch.profiler.profile`` (ops, ranges and ``[memory]`` events)."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    return list(results.events()) if results is not None else []


def memory_events(events: list[Any], device: torch.device) -> list[tuple[int, int]]:
    """``(time ns, signed bytes)`` of the profiler's ``[memory]`` events for ``device``, in time order.

    Each event is one allocation (positive) or free (negative) reported by the allocator while the
    profiler ran with ``profile_memory=True``. Host memory is the CPU allocator (CPU, MKLDNN, IDEEP);
    GPU memory the caching allocator of ``device``'s index.
    """
    out = []
    wanted = _DEVICE_TYPES if device.type != "cpu" else _HOST_TYPES
    index = device.index if device.index is not None else (0 if device.type == "cuda" else None)
    for e in events:
        if e.name() != "[memory]":
            continue
        kind = getattr(e.device_type(), "name", str(e.device_type()).rsplit(".", 1)[-1])
        if kind not in wanted:
            continue
        if device.type != "cpu" and index is not None and e.device_index() not in (index, -1):
            continue
        out.append((int(e.start_ns()), int(e.nbytes())))
    out.sort(key=lambda item: item[0])
    return out


def range_events(events: list[Any], names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``{name: (start ns, end ns)}`` of the last profiler event with each of ``names``."""
    out = {}
    for e in events:
        name = e.name()
        if name in names:
            out[name] = (int(e.start_ns()), int(e.end_ns()))
    return out


def downsample(points: list[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    """At most about ``max_points`` points, keeping each time bucket's lowest and highest ``bytes``
    (so the peak and the troughs survive) and the last point."""
    if max_points <= 0 or len(points) <= max_points:
        return list(points)
    buckets = max(1, max_points // 2)
    size = len(points) / buckets
    out: list[dict[str, Any]] = []
    for b in range(buckets):
        chunk = points[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        lo = min(range(len(chunk)), key=lambda i: chunk[i]["bytes"])
        hi = max(range(len(chunk)), key=lambda i: chunk[i]["bytes"])
        out.extend(chunk[i] for i in sorted({lo, hi}))
    if out[-1] is not points[-1]:
        out.append(points[-1])
    return out
