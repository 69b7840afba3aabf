"""This repository's benchmarks (not part of the installed package).

* ``harness/``: the suite behind docs/benchmarks.md (``python -m benches.harness``);
* ``micro/``: pytest-benchmark files (``python -m pytest benches/micro --benchmark-only -p no:cacheprovider``);
* ``experiments/``: scripts behind docs/results.md and the hand-written benchmark numbers.
"""
