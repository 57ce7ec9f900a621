"""The technique registry: every compression technique is a frozen config dataclass plus the function that
applies it, registered under a ``family/name`` so the CLI, recipes, the optimizer's search and the tests
can enumerate them.

``tk.quantize(model, config)``, ``tk.prune(...)`` and ``tk.distill(...)`` look up the function registered
for ``type(config)`` (the torchao ``quantize_`` shape). A technique declares what it needs (``x86``,
``cuda``, ``onnxruntime``, ``torchao``, ``torch_pruning``, ``compile``); :func:`check_technique` says
what is missing on this machine and :func:`require` raises a :class:`TechniqueUnavailableError` naming
it -- never a silent fallback to something slower.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Halve:
...     factor: float = 0.5
>>> @register_technique("example/halve", Halve, summary="multiply every weight by a factor")
... def _halve(model, config, **kw):
...     return model
>>> "example/halve" in list_techniques("example/*")
True
>>> get_technique(Halve()).name, get_technique("example/halve").config_type is Halve
('example/halve', True)
>>> _unregister("example/halve")
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from torchkiln.errors import KilnError

__all__ = [
    "REQUIREMENTS",
    "Technique",
    "TechniqueError",
    "TechniqueUnavailableError",
    "check_technique",
    "describe_techniques",
    "get_technique",
    "list_techniques",
    "register_technique",
    "require",
]


class TechniqueError(KilnError, ValueError):
    """An unknown technique or a config with invalid values."""


class TechniqueUnavailableError(KilnError, RuntimeError):
    """A technique needs something this machine or installation does not have."""


def _module(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if importlib.util.find_spec(name) is None:
            return f"the Python package {name!r} is not installed (pip install {name.replace('_', '-')})"
        return None

    return check


def _x86() -> str | None:
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return f"an x86 CPU (this machine is {machine})"
    return None


def _cuda() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "a CUDA GPU (torch.cuda.is_available() is False)"


def _compiler() -> str | None:
    import os

    if os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"):
        return None
    return "a C++ compiler for inductor (g++ or clang++ on PATH, or $CXX)"


def _fbgemm() -> str | None:
    import torch

    engines = torch.backends.quantized.supported_engines
    if "fbgemm" in engines or "x86" in engines or "qnnpack" in engines:
        return None
    return f"a quantized engine (fbgemm/x86/qnnpack); this torch has {engines}"


#: requirement name -> a check returning None when met or a sentence saying what is missing.
REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "x86": _x86,
    "cuda": _cuda,
    "compile": _compiler,
    "quantized-engine": _fbgemm,
    "torchao": _module("torchao"),
    "torch_pruning": _module("torch_pruning"),
    "onnx": _module("onnx"),
    "onnxruntime": _module("onnxruntime"),
    "onnxscript": _module("onnxscript"),
}


@dataclass(frozen=True)
class Technique:
    """A registered technique: its name, config type, apply function, requirements and a one-line summary."""

    name: str
    config_type: type
    apply: Callable[..., Any]
    needs: tuple[str, ...] = ()
    summary: str = ""

    @property
    def family(self) -> str:
        return self.name.split("/", 1)[0]


_REGISTRY: dict[str, Technique] = {}
_BY_TYPE: dict[type, str] = {}


def register_technique(
    name: str, config_type: type, *, needs: tuple[str, ...] = (), summary: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(model, config, **kwargs)`` as the technique ``name`` for ``config_type``.

    ``name`` is ``family/technique`` (``quantize/int8-dynamic``); ``config_type`` must be a frozen
    dataclass; ``needs`` are keys of :data:`REQUIREMENTS`.
    """
    if name.count("/") != 1 or not all(name.split("/")):
        raise TechniqueError(f"technique name {name!r} must look like 'family/name'")
    if not (is_dataclass(config_type) and config_type.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TechniqueError(f"technique {name!r}: config {config_type.__name__} must be a frozen dataclass")
    unknown = [n for n in needs if n not in REQUIREMENTS]
    if unknown:
        raise TechniqueError(
            f"technique {name!r}: unknown requirement(s) {unknown}; accepted: {', '.join(REQUIREMENTS)}"
        )

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = Technique(name, config_type, fn, tuple(needs), summary)
        _BY_TYPE[config_type] = name
        return fn

    return decorator


def _unregister(name: str) -> None:
    tech = _REGISTRY.pop(name)
    _BY_TYPE.pop(tech.config_type, None)


def _load_builtin() -> None:
    # The built-in techniques register themselves on import; importing here keeps `import torchkiln` fast.
    for module in ("quantize", "prune", "distill"):
        if importlib.util.find_spec(f"torchkiln.compress.{module}") is not None:
            importlib.import_module(f"torchkiln.compress.{module}")


def list_techniques(pattern: str = "*") -> list[str]:
    """Registered technique names matching a glob ``pattern`` (``"quantize/*"``), sorted."""
    _load_builtin()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_technique(name_or_config: str | Any) -> Technique:
    """The :class:`Technique` for a name or a config instance; an unknown one names the close matches."""
    _load_builtin()
    if isinstance(name_or_config, str):
        tech = _REGISTRY.get(name_or_config)
        if tech is None:
            close = difflib.get_close_matches(name_or_config, list(_REGISTRY), n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise TechniqueError(
                f"unknown technique {name_or_config!r}{hint}; registered: {', '.join(sorted(_REGISTRY))}"
            )
        return tech
    name = _BY_TYPE.get(type(name_or_config))
    if name is None:
        raise TechniqueError(
            f"{type(name_or_config).__name__} is not a registered technique config; registered configs: "
            f"{', '.join(sorted(t.config_type.__name__ for t in _REGISTRY.values()))}"
        )
    return _REGISTRY[name]


def check_technique(name_or_config: str | Any) -> list[str]:
    """What this machine lacks for a technique: one sentence per missing requirement (empty when none)."""
    tech = get_technique(name_or_config)
    missing = []
    for need in tech.needs:
        reason = REQUIREMENTS[need]()
        if reason:
            missing.append(reason)
    return missing


def require(name_or_config: str | Any) -> Technique:
    """The technique, or a :class:`TechniqueUnavailableError` that names everything that is missing."""
    tech = get_technique(name_or_config)
    missing = check_technique(tech.name)
    if missing:
        raise TechniqueUnavailableError(
            f"technique {tech.name!r} cannot run here: it needs {'; '.join(missing)}"
        )
    return tech


def describe_techniques(pattern: str = "*") -> list[dict[str, Any]]:
    """``[{"name", "config", "fields", "needs", "missing", "summary"}]`` for the matching techniques."""
    out = []
    for name in list_techniques(pattern):
        tech = _REGISTRY[name]
        out.append(
            {
                "name": name,
                "config": tech.config_type.__name__,
                "fields": [f.name for f in fields(tech.config_type)],
                "needs": list(tech.needs),
                "missing": check_technique(name),
                "summary": tech.summary,
            }
        )
    return out
