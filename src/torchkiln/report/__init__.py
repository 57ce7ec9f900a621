"""Run history (SQLite), comparisons and the HTML report."""

from torchkiln.report.history import History, HistoryError, Run, default_history_path


def __getattr__(name: str):
    # The report pulls in jinja2 and matplotlib: import it only when asked for.
    if name in ("render_report", "report_for"):
        from torchkiln.report import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["History", "HistoryError", "Run", "default_history_path", "render_report", "report_for"]
