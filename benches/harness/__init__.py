"""The project's benchmark harness: what fxprune delivers, against the original models and
against Torch-Pruning, on this machine, judged against the project's goals (issue 8), rendered into
``docs/benchmarks.md`` (between its markers), ``docs/benchmarks.json`` and ``docs/benchmarks-plots/``.

It lives in the repository, not in the installed package: run it from a checkout's root with
``python -m benches.harness [--models resnet18,resnet50] [--doc docs/benchmarks.md] ...``
(``--help`` lists every option; ``--root`` names another checkout). Users time their own models
with the package's small ``fxprune bench MODEL`` instead (`fxprune.benchmark`).

* `config.BenchConfig`: what to measure; `suite.run_suite`: every number as plain JSON;
* `compile_speed`: fxprune's stages and peak memory; `peer`: Torch-Pruning at the same MACs;
* `metrics`: MACs/params/output shapes counted alike for every model; `memory`: peak memory;
* `goals`: issue 8's goals judged from the numbers; `report`: Markdown tables and the doc;
  `plots`: PNGs (matplotlib, optional); `kernels`: the masked-convolution kernel benchmarks
  (``benches/micro/bench_kernels.py``); `machine`: machine, versions, load average, the repository;
* `cli`: the command line (``python -m benches.harness``).

Example::

    >>> from benches.harness import BenchConfig, run_suite, render
    >>> res = run_suite(BenchConfig(models=["fxprune:lenet5"], flops=(0.5,), round_to=(None,), batches=(1,),
    ...                             compile_repeats=1, method_repeats=1, latency_repeats=1, compare=False),
    ...                 log=lambda line: None)
    >>> "lenet5" in render(res)
    True
"""
from .config import DEFAULT_MODELS, BenchConfig
from .report import render, write_doc, write_json
from .suite import run_suite

__all__ = ["DEFAULT_MODELS", "BenchConfig", "render", "run_suite", "write_doc", "write_json"]
