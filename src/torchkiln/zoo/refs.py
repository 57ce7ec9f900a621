"""Resolve user code given by reference: ``package.module:attr`` or ``path/to/file.py:attr``.

>>> from torchkiln.zoo.refs import is_reference, load_reference
>>> is_reference("os.path:join"), is_reference("mlp")
(True, False)
>>> load_reference("os.path:join", require_callable=True)("a", "b")
'a/b'
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
from pathlib import Path
from types import ModuleType

from torchkiln.errors import UserCodeError

__all__ = ["is_reference", "load_reference", "load_file_module"]

_ATTR_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FORMS = "'package.module:attribute' or 'path/to/file.py:attribute'"
_LOCK = threading.RLock()
# absolute file path -> (mtime_ns, size, module); a file is executed once unless it changes.
_FILE_MODULES: dict[str, tuple[int, int, ModuleType]] = {}


def is_reference(s: str) -> bool:
    """True if ``s`` looks like a reference to user code (``target:attr``), not a registered name.

    The part after the last colon must be a dotted Python identifier and the part before it must
    be non-empty, so Windows drive letters (``C:\\models\\m.py:make``) work.

    >>> is_reference("my_pkg.models:make_net"), is_reference("models/net.py:Net.build")
    (True, True)
    >>> is_reference("resnet-tiny"), is_reference("x.py:")
    (False, False)
    """
    if not isinstance(s, str) or ":" not in s:
        return False
    target, _, attr = s.rpartition(":")
    return bool(target.strip()) and bool(_ATTR_PATH.match(attr))


def _split(ref: str, what: str) -> tuple[str, str]:
    if not isinstance(ref, str) or ":" not in ref:
        raise UserCodeError(f"{what} reference {ref!r} has no ':'; expected {_FORMS}")
    target, _, attr = ref.rpartition(":")
    target = target.strip()
    if not target:
        raise UserCodeError(f"{what} reference {ref!r} names no module or file before ':'; expected {_FORMS}")
    if not _ATTR_PATH.match(attr):
        raise UserCodeError(
            f"{what} reference {ref!r}: {attr!r} after ':' is not a (dotted) Python identifier; "
            f"expected {_FORMS}"
        )
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load_file_module(path: str | os.PathLike[str], *, what: str = "object") -> ModuleType:
    """Execute a Python file as a module (once per content change) and return it.

    The module gets a unique name (``torchkiln_user.<stem>_<hash>``) and is put in ``sys.modules`` so
    that objects defined there can be pickled. The file's directory is on ``sys.path`` while it runs,
    so ``import sibling`` inside it works.
    """
    file = Path(path).expanduser()
    if not file.is_absolute():
        file = Path.cwd() / file
    file = file.resolve()
    if not file.is_file():
        hint = "it is a directory" if file.is_dir() else "no such file"
        raise UserCodeError(f"{what} file {str(path)!r} ({file}) cannot be loaded: {hint}")
    with _LOCK:
        stat = file.stat()
        key = str(file)
        cached = _FILE_MODULES.get(key)
        if cached is not None and cached[0] == stat.st_mtime_ns and cached[1] == stat.st_size:
            return cached[2]
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        stem = re.sub(r"\W", "_", file.stem)
        name = f"torchkiln_user_{stem}_{digest}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:  # pragma: no cover - .py files always get a loader
            raise UserCodeError(f"{what} file {str(file)!r} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        directory = str(file.parent)
        added = directory not in sys.path
        if added:
            sys.path.insert(0, directory)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(name, None)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise UserCodeError(f"{what} file {str(file)!r} failed to import: {_describe(exc)}") from exc
        finally:
            if added:
                try:
                    sys.path.remove(directory)
                except ValueError:  # pragma: no cover - the user's code removed it already
                    pass
        _FILE_MODULES[key] = (stat.st_mtime_ns, stat.st_size, module)
        return module


def _import_module(target: str, ref: str, what: str) -> ModuleType:
    # Like ``python -m``, modules in the current directory are importable: the CLI's sys.path holds
    # the script's directory, not the cwd. The cwd goes last so it never shadows installed packages.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (target == missing or target.startswith(missing + ".")):
            raise UserCodeError(
                f"{what} reference {ref!r}: no module named {missing!r} (looked in sys.path and the "
                f"current directory {cwd}); expected {_FORMS}"
            ) from exc
        raise UserCodeError(
            f"{what} reference {ref!r}: importing {target!r} failed: {_describe(exc)}"
        ) from exc
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise UserCodeError(
            f"{what} reference {ref!r}: importing {target!r} failed: {_describe(exc)}"
        ) from exc
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:  # pragma: no cover
                pass


def _resolve_attr(obj: object, attr: str, ref: str, where: str, what: str) -> object:
    current = obj
    walked: list[str] = []
    for part in attr.split("."):
        if not hasattr(current, part):
            names = [n for n in dir(current) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            owner = where if not walked else f"{'.'.join(walked)} in {where}"
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            shown = ", ".join(sorted(names)[:20]) + (", ..." if len(names) > 20 else "")
            raise UserCodeError(
                f"{what} reference {ref!r}: {owner} has no attribute {part!r}{hint} "
                f"(available: {shown or 'none'})"
            )
        current = getattr(current, part)
        walked.append(part)
    return current


def load_reference(ref: str, *, what: str = "object", require_callable: bool = False) -> object:
    """Return the object that ``ref`` names.

    ``ref`` is ``package.module:attr`` (imported with importlib; the current directory is importable)
    or ``path/to/file.py:attr`` (relative to the current directory or absolute). ``attr`` may be a
    dotted path (``module:Class.method``). ``what`` names the object in error messages ("model
    factory", "dataset factory", ...); with ``require_callable`` the object must be callable.

    Every failure raises :class:`~torchkiln.errors.UserCodeError` saying what was wrong and where.

    >>> load_reference("math:sqrt", what="function", require_callable=True)(16.0)
    4.0
    >>> load_reference("collections:OrderedDict.fromkeys", require_callable=True).__name__
    'fromkeys'
    """
    target, attr = _split(ref, what)
    if _is_file_target(target):
        module = load_file_module(target, what=what)
        where = f"file {target!r}"
    else:
        module = _import_module(target, ref, what)
        where = f"module {target!r}"
    obj = _resolve_attr(module, attr, ref, where, what)
    if require_callable and not callable(obj):
        raise UserCodeError(
            f"{what} reference {ref!r} is of type {type(obj).__name__}, not callable; "
            "expected a function or class to call"
        )
    return obj
