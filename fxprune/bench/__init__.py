"""The benchmark suite behind ``fxprune bench``: what fxprune delivers, against the original models
and against Torch-Pruning, on this machine.

* `config.BenchConfig`: what to measure; `suite.run_suite`: every number as plain JSON;
* `compile_speed`: fxprune's stages and peak memory; `peer`: Torch-Pruning at the same MACs;
* `metrics`: MACs/params/output shapes counted alike for every model; `memory`: peak memory;
* `goals`: issue 8's goals judged from the numbers; `report`: Markdown tables and the doc;
  `plots`: PNGs (matplotlib, optional); `kernels`: the masked-convolution kernel benchmarks;
  `machine`: machine, versions, load average.

Example::

    >>> from fxprune.bench import BenchConfig, run_suite, render
    >>> res = run_suite(BenchConfig(models=["fxprune:lenet5"], flops=(0.5,), round_to=(None,), batches=(1,),
    ...                             compile_repeats=1, method_repeats=1, latency_repeats=1, compare=False))
    >>> "lenet5" in render(res)
    True
"""
from .config import DEFAULT_MODELS, BenchConfig
from .report import render, write_doc, write_json
from .suite import run_suite

__all__ = ["DEFAULT_MODELS", "BenchConfig", "render", "run_suite", "write_doc", "write_json"]
