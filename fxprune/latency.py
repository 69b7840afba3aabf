"""Wall-clock latency of a forward pass: median of repeats after warm-up, in milliseconds.

`median_latency_ms` times one model within a time budget (the zoo runner's quick number).
`interleaved_latency_ms` times several models on the same inputs round-robin (model A, B, C, A,
B, C, ...), so a burst of load from another process hits every model alike instead of whichever
happened to be timed at that moment; the benchmark suite compares original and slim models
with it. `paired_latency_ratio` compares two models of nearly the same cost (fxprune's and
Torch-Pruning's slim models at the same MACs) pair by pair. `steady_heap` keeps the allocator in
one state while timing (see its docstring). On CUDA the time of each call is taken with CUDA events (the GPU's own clock), on the
CPU with `time.perf_counter`.

Example::

    >>> import torch, torchvision
    >>> from fxprune.inputs import ExampleInputs
    >>> from fxprune.latency import interleaved_latency_ms
    >>> x = ExampleInputs.normalize(torch.randn(1, 3, 64, 64))
    >>> models = {"r18": torchvision.models.resnet18(), "r34": torchvision.models.resnet34()}
    >>> ms = interleaved_latency_ms(models, x, repeats=3, warmup=1)
    >>> sorted(ms) == ["r18", "r34"] and all(v["median_ms"] > 0 for v in ms.values())
    True
"""
from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from typing import Callable

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


def _on_cuda(inputs: ExampleInputs) -> bool:
    return any(t.is_cuda for t in inputs.tensors())


def time_call_ms(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds one call of `fn` takes: CUDA events around it on the GPU, perf_counter on the CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t)


def interleaved_latency_ms(models: dict[str, nn.Module], inputs: ExampleInputs, *, repeats: int = 5,
                           warmup: int = 2) -> dict[str, dict]:
    """Per model: median, min and every repeat's milliseconds, timed round-robin after `warmup` calls each.

    Models run in eval mode under `torch.inference_mode`; their own train/eval flags come back after.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    cuda = _on_cuda(inputs)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), eval_mode(*models.values()):
        for model in models.values():
            for _ in range(warmup):
                inputs.call(model)
        if cuda:
            torch.cuda.synchronize()
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(time_call_ms(lambda m=model: inputs.call(m), cuda))
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "repeats_ms": t} for name, t in times.items()}


def paired_latency_ratio(a: nn.Module, b: nn.Module, inputs: ExampleInputs, *, pairs: int = 9,
                         warmup: int = 1) -> dict:
    """Time of `a` over time of `b`, measured as back-to-back pairs whose order alternates (a b, b a,
    a b, ...): the median of the per-pair ratios, their quartiles and every pair's times.

    Two models of nearly the same cost cannot be told apart by two medians taken in a round-robin
    of many models (a slow spell lands on whichever runs then, and each model always follows the
    same one). A ratio taken within each pair cancels slow spells longer than a pair, and the
    alternation cancels the order. The quartiles are the noise to judge the median against.
    """
    if pairs < 1 or warmup < 0:
        raise ValueError(f"pairs={pairs} must be >= 1 and warmup={warmup} >= 0")
    cuda = _on_cuda(inputs)
    ratios, times = [], []
    with torch.inference_mode(), eval_mode(a, b):
        for model in (a, b):
            for _ in range(warmup):
                inputs.call(model)
        for i in range(pairs):
            order = (a, b) if i % 2 == 0 else (b, a)
            t = {id(m): time_call_ms(lambda m=m: inputs.call(m), cuda) for m in order}
            ratios.append(t[id(a)] / t[id(b)])
            times.append((t[id(a)], t[id(b)]))
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"ratio_median": median, "ratio_q1": q1, "ratio_q3": q3, "pairs": pairs, "pairs_ms": times}


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def steady_heap():
    """While timing, glibc serves every allocation from reused heap memory (no mmap, no trimming).

    Why: by default glibc maps each allocation above a threshold fresh from the kernel and unmaps
    it when freed, so every forward pass page-faults its large activations again; the threshold
    moves with what the process freed before. At batch 32 that costs a resnet50 up to ~40% of its
    time, and whether a model pays it depended on what else had run in the process (Torch-Pruning's
    search in the same process moved the original by 18-40%, either way). With reused memory every model is
    timed in the same state. Yields whether it applied (glibc only); the defaults come back after.
    """
    libc = _glibc()
    if libc is None:
        yield False
        return
    applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield applied
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)
