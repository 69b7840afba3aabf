"""Experiment scripts behind docs/results.md and the hand-written numbers of docs/benchmarks.md and
docs/compile-speed.md (each script's docstring says how to run it)."""
