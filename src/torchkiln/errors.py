"""Exception types. Every message says what was wrong, where, and what would be accepted."""

from __future__ import annotations


class KilnError(Exception):
    """Base class for errors torchkiln raises on purpose (the CLI prints these without a traceback)."""


class RecipeError(KilnError, ValueError):
    """A recipe (file, override or keyword arguments) is invalid."""


class UserCodeError(KilnError, ImportError):
    """User code given by reference could not be imported, or returned the wrong kind of object."""


class NonFiniteLossError(KilnError, FloatingPointError):
    """Training produced too many non-finite (NaN/inf) losses in a row."""


class CheckpointError(KilnError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model being resumed."""
