"""pytest-benchmark micro-benchmarks: ``python -m pytest benches/micro --benchmark-only -p no:cacheprovider``."""
