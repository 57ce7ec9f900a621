"""Mixed precision: autocast contexts and the fp16 GradScaler, on CPU and CUDA.

fp16 needs loss scaling; the scaler is unscaled once after the last micro-batch of a window, then
gradients are clipped, then ``scaler.step`` and ``scaler.update``. A step the scaler skipped (it found
inf/NaN gradients) is detected from the scale dropping, and does not advance the schedule.

>>> p = Precision("bf16", "cpu")
>>> import torch
>>> with p.autocast():
...     torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype
torch.bfloat16
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _FP32FlashAttention(TorchFunctionMode):
    """Run ``F.scaled_dot_product_attention`` on reduced-precision CPU tensors in fp32 with the flash
    kernel, casting the result back; every other op passes through untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) >= 3:
            q, k, v = args[:3]
            if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with torch.autocast("cpu", enabled=False), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    mask = kwargs.get("attn_mask")
                    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
                        kwargs = {**kwargs, "attn_mask": mask.float()}
                    out = func(q.float(), k.float(), v.float(), *args[3:], **kwargs)
                return out.to(q.dtype)
        return func(*args, **kwargs)


def sdpa_context(backend: str, precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The scaled_dot_product_attention kernel choice for training forwards.

    ``auto``: on CPU under bf16/fp16 autocast, ``flash-fp32`` -- attention computed in fp32 with the
    flash kernel (more accurate, and faster there). PyTorch's CPU kernels are slow for reduced-precision
    attention training: the math kernel upcasts to fp32 internally and the flash kernel's backward is
    slow in bf16. Attention forward+backward for (32, 4, 128, 32), 1 thread, on a 2-core avx512_bf16
    machine: bf16 math 38.9 ms, bf16 flash 52.3 ms, fp32 flash 24.2 ms (fp32 math 48.2 ms).
    Elsewhere ``auto`` leaves PyTorch's own choice.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "auto":
        backend = "flash-fp32" if (device_type == "cpu" and precision in ("bf16", "fp16")) else "default"
    if backend == "default":
        return contextlib.nullcontext()
    if backend == "flash-fp32":
        return _FP32FlashAttention()
    kernels = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    return sdpa_kernel([kernels[backend]])


class Precision:
    """Autocast + optional GradScaler for one device type."""

    def __init__(self, name: str, device_type: str, *, init_scale: float = 2.0**16) -> None:
        if name not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {name!r}")
        self.name = name
        self.dtype = _DTYPES[name]
        self.device_type = device_type
        if name == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("precision='bf16' needs a GPU with bfloat16 support (Ampere or newer)")
        self.scaler: torch.amp.GradScaler | None = None
        if name == "fp16":
            self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale gradients in place (once per optimizer step, before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Take the optimizer step; return False when the scaler skipped it (inf/NaN gradients)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # GradScaler lowers the scale exactly when it skipped the step because of found infs.
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
