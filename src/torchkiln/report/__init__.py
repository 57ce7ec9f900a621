"""Run history (SQLite), comparisons and the HTML report."""

from torchkiln.report.history import History, HistoryError, Run, default_history_path

__all__ = ["History", "HistoryError", "Run", "default_history_path"]
