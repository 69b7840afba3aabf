"""Method evidence: an experiment runner for the data-driven methods against `uniform` and `l1`.

``python -m benches.experiments.evidence [--quick] [--only NAME,...] [--out DIR] [--docs FILE]``
runs every cell of a TOML spec (default `evidence.toml`: models x methods x MACs targets x data
regimes x seeds), writes one JSON record per run (resumable: finished runs are kept and skipped),
and regenerates the tables of docs/results.md: mean ± 95 % interval over seeds, whether every
compared model landed within 1 % of the target MACs, and paired differences against `uniform`,
`l1` and the unpruned baseline. Not part of the library's import path.
"""
