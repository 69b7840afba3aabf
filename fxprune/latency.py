"""Wall-clock latency of a forward pass: median of repeats after warm-up, in milliseconds."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .inputs import ExampleInputs
from .verify import eval_mode


def median_latency_ms(model: nn.Module, inputs: ExampleInputs, *, budget_s: float = 2.0, min_repeats: int = 3,
                      max_repeats: int = 30, warmup: int = 2) -> float:
    """Median forward time; as many repeats as fit in `budget_s` (within the bounds)."""
    with torch.inference_mode(), eval_mode(model):
        start = time.perf_counter()
        for _ in range(warmup):
            inputs.call(model)
        per_call = max((time.perf_counter() - start) / warmup, 1e-6)
        repeats = int(min(max_repeats, max(min_repeats, budget_s / per_call)))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            inputs.call(model)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)
