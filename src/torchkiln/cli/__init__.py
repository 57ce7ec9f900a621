"""The ``kiln`` command line: one module per command, each thin (parse, call the library, print)."""

from typing import Any


def make_console(**kwargs: Any) -> Any:
    """A rich Console; written to a log or a pipe (no terminal, no ``$COLUMNS``) it is 160 columns wide,
    so tables keep one line per row instead of wrapping at the 80 columns rich assumes."""
    import os

    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160, **kwargs)
    return console
