"""How long fxprune takes to compile a model, stage by stage, and the peak memory of one compile.

The stages are `compress`'s own timings (``fxprune_report.timings``): trace, shapes (meta-tensor
propagation and MAC count), analysis (channel groups, structures, cost model), method (scores and
the selection search), rewrite and verification. Every repeat is a full `compress` with
verification; the first call is a warm-up (imports, first-call caches) and not counted.
``compile`` = trace + shapes + analysis + rewrite (issue 8's goal: no method, no verification);
``compile_with_method`` adds the method, which is what `compress(..., verify=False)` costs.

Example::

    >>> import torch, torchvision
    >>> from benches.harness.compile_speed import time_compile
    >>> r = time_compile(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), 0.5, repeats=2)
    >>> 0 < r["compile_s"] < r["compile_with_method_s"] <= r["stages_s"]["total"]
    True
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable

from torch import nn

from fxprune import DATA_FREE_METHODS, compress
from .memory import PeakMemory

STAGES = ("trace", "shapes", "analysis", "method", "rewrite", "verify", "total")
COMPILE = ("trace", "shapes", "analysis", "rewrite")


def time_compile(model: nn.Module, example_inputs: Any, flops: float, *, repeats: int = 5,
                 method: str = "l1", round_to: int | None = None) -> dict:
    """Median seconds of each stage over `repeats` compiles, and the peak MiB of one without verification."""
    runs = []
    for i in range(repeats + 1):
        slim = compress(model, method, example_inputs, flops, round_to=round_to)
        if i:
            runs.append(dict(slim.fxprune_report.timings))
    del slim
    with PeakMemory() as peak:
        slim = compress(model, method, example_inputs, flops, round_to=round_to, verify=False)
    del slim
    stages = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    return {
        "stages_s": stages,
        "compile_s": statistics.median(sum(r[k] for k in COMPILE) for r in runs),
        "compile_with_method_s": statistics.median(sum(r[k] for k in (*COMPILE, "method")) for r in runs),
        "peak_mib": peak.mib, "peak_method": peak.method, "repeats": repeats, "method": method,
    }


def time_methods(model: nn.Module, example_inputs: Any, flops: float, *, repeats: int = 3,
                 methods: Iterable[str] = DATA_FREE_METHODS) -> dict:
    """Median seconds of the method pass (scores + selection at `flops`) of each data-free method."""
    out = {}
    for method in methods:
        times = [compress(model, method, example_inputs, flops, verify=False).fxprune_report.timings["method"]
                 for _ in range(repeats)]
        out[method] = statistics.median(times)
    return out
