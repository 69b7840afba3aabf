"""Batch conversion of model zoos: `fxprune zoo` (see runner.py for isolation and resume)."""
from .catalog import TASKS, ZooEntry, select, user_entries
from .report import markdown, write_report
from .runner import ZooInterrupted, run_zoo

__all__ = ["TASKS", "ZooEntry", "ZooInterrupted", "markdown", "run_zoo", "select", "user_entries", "write_report"]
