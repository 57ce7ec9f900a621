"""Name -> factory registries for models and datasets, and checking keyword arguments against them.

>>> from torchkiln.zoo.registry import MODELS
>>> MODELS.check_args("mlp", {"hidden": (32,)}) is None
True
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torchkiln.errors import RecipeError
from torchkiln.zoo.refs import is_reference, load_reference

__all__ = ["Entry", "Registry", "MODELS", "DATASETS", "SPLITS", "first_doc_line"]

SPLITS: tuple[str, ...] = ("train", "val", "test")


def first_doc_line(obj: object) -> str:
    """The first non-empty line of ``obj``'s docstring ("" if none)."""
    doc = inspect.getdoc(obj) or ""
    for line in doc.splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class Entry:
    """One registered factory."""

    name: str
    factory: Callable[..., Any]
    description: str
    splits: tuple[str, ...] = field(default=SPLITS)


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return None


def _accepted(sig: inspect.Signature, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for p in sig.parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        elif p.default is p.empty:
            out.append(f"{p.name} (required)")
        else:
            out.append(f"{p.name}={p.default!r}")
    return out


def _check_literals(fn: Callable[..., Any], kwargs: dict[str, Any], label: str) -> None:
    """Check values given for ``Literal[...]``-annotated parameters (cheap, catches typos early)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations in user code: binding was checked, that is enough
        return
    for key, value in kwargs.items():
        hint = hints.get(key)
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise RecipeError(
                    f"{label}: argument {key}={value!r} is not accepted; "
                    f"expected one of {', '.join(repr(a) for a in allowed)}"
                )


def check_call(
    fn: Callable[..., Any], kwargs: dict[str, Any], label: str, fixed: dict[str, Any] | None = None
) -> None:
    """Raise :class:`RecipeError` (a ``ValueError``) if ``kwargs`` do not bind to ``fn``'s signature.

    ``fixed`` are arguments the caller always passes (``split`` for datasets); they are bound but
    not listed as accepted.
    """
    fixed = fixed or {}
    sig = _signature(fn)
    if sig is None:
        return
    skip = tuple(fixed)
    params = sig.parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = _accepted(sig, skip)
    shown = ", ".join(accepted) or "no keyword arguments"
    if not has_var_kw:
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing_fixed = [k for k in fixed if k not in names]
        if missing_fixed:
            raise RecipeError(
                f"{label}: the factory must accept the keyword argument(s) "
                f"{', '.join(repr(k) for k in missing_fixed)} (torchkiln always passes them); "
                f"its signature is {sig}"
            )
        unknown = [k for k in kwargs if k not in names or k in skip]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.7)
                if close:
                    hints.append(f"{close[0]!r}" if len(unknown) == 1 else f"{close[0]!r} for {key!r}")
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            plural = "s" if len(unknown) > 1 else ""
            raise RecipeError(
                f"{label}: unknown argument{plural} {', '.join(repr(k) for k in unknown)}{hint}; "
                f"accepted: {shown}"
            )
    try:
        sig.bind(**fixed, **kwargs)
    except TypeError as exc:
        raise RecipeError(
            f"{label}: arguments {sorted(kwargs)} do not fit: {exc}; accepted: {shown}"
        ) from exc
    _check_literals(fn, kwargs, label)


class Registry:
    """Factories registered by name; ``kind`` ("model", "dataset") appears in messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, splits: tuple[str, ...] = SPLITS, description: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a factory under ``name``; returns the factory unchanged."""
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise RecipeError(
                f"cannot register {self.kind} {name!r}: a name is a non-empty string without ':' "
                "or surrounding spaces (':' marks user references)"
            )

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if not callable(factory):
                raise RecipeError(f"cannot register {self.kind} {name!r}: {factory!r} is not callable")
            old = self._entries.get(name)
            if old is not None and _qualname(old.factory) != _qualname(factory):
                raise RecipeError(
                    f"{self.kind} {name!r} is already registered by {_qualname(old.factory)}; "
                    f"cannot register {_qualname(factory)} under the same name"
                )
            desc = description if description is not None else first_doc_line(factory)
            self._entries[name] = Entry(name, factory, desc, tuple(splits))
            return factory

        return decorator

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def entry(self, name: str) -> Entry:
        """The registered entry for ``name``; an unknown name raises with the available names."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        available = self.names()
        close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.7)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RecipeError(
            f"unknown {self.kind} {name!r}.{hint} Available {self.kind}s: {', '.join(available) or 'none'}; "
            "or give user code as 'package.module:function' or 'path/to/file.py:function'"
        )

    def resolve(self, name: str) -> tuple[Callable[..., Any], str]:
        """The factory for a registered name or a reference, and a label for messages."""
        if not isinstance(name, str):
            raise RecipeError(f"{self.kind} name must be a string, got {type(name).__name__} {name!r}")
        if name in self._entries:
            return self._entries[name].factory, f"{self.kind} {name!r}"
        if is_reference(name):
            factory = load_reference(name, what=f"{self.kind} factory", require_callable=True)
            return factory, f"{self.kind} reference {name!r}"
        if ":" in name:
            # Looks like a reference but is malformed: let load_reference explain what is wrong.
            load_reference(name, what=f"{self.kind} factory", require_callable=True)
        self.entry(name)  # raises with the list of names
        raise AssertionError("unreachable")  # pragma: no cover

    def check_args(self, name: str, kwargs: dict[str, Any], fixed: dict[str, Any] | None = None) -> None:
        factory, label = self.resolve(name)
        if not isinstance(kwargs, dict):
            raise RecipeError(f"{label}: arguments must be a mapping, got {type(kwargs).__name__}")
        check_call(factory, kwargs, label, fixed)

    def _unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register temporary factories)."""
        self._entries.pop(name, None)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


MODELS = Registry("model")
DATASETS = Registry("dataset")
