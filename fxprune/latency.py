"""Wall-clock latency of a forward pass: median of repeats after warm-up, in milliseconds.

`median_latency_ms` times one model within a time budget (the zoo runner's quick number).
`interleaved_latency_ms` times several models on the same inputs round-robin (model A, B, C, A,
B, C, ...), so a burst of load from another process hits every model alike instead of whichever
happened to be timed at that moment; the benchmark suite compares original and slim models
with it. `paired_latency_ratio` compares two models of nearly the same cost (fxprune's and
Torch-Pruning's slim models at the same MACs) pair by pair. `steady_heap` keeps the allocator in
one state while timing (see its docstring). On CUDA the time of each call is taken with CUDA events (the GPU's own clock), on the
CPU with `time.perf_counter`.

A latency carries its own quality (`LatencyMeasurement`): the quartiles of its repeats and the
median of the warm-up calls before them. `LatencyMeasurer` times a group of models round-robin
after at least `MIN_WARMUP` warm-up calls each (the first calls of a model allocate) and judges
every latency: one whose repeats spread by more than `SPREAD_LIMIT` (interquartile range over the
median) or whose warm-up median differs from the steady median by more than `WARMUP_LIMIT` times
is measured again, the whole group so that the models stay timed side by side, with twice the
warm-up each time, at most `EXTRA_ROUNDS` more times; if it is still so, it is marked unstable
(`stable` False, `reason` says why) and must not be reported as a result. `measure_latencies`
does this for real models; the project's suite (`python -m benches.harness`) and `fxprune bench` use it.

Example::

    >>> import torch, torchvision
    >>> from fxprune.passes.inputs import ExampleInputs
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
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .passes.inputs import ExampleInputs
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


SPREAD_LIMIT = 0.2  # interquartile range of the repeats over their median, at most
WARMUP_LIMIT = 2.0  # warm-up median and steady median within this factor of each other
MIN_WARMUP = 3  # warm-up calls per model at least: the first call allocates, the median of 3 ignores it
EXTRA_ROUNDS = 2  # re-measurements of an unstable latency, warm-up doubled each time


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (inclusive method; all three the value itself for one value)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, statistics.median(values), q3


def _relative(spread: float, median: float) -> float:
    if median > 0:
        return spread / median
    return 0.0 if spread == 0 else math.inf


@dataclass(frozen=True)
class LatencyMeasurement:
    """One model's latency with its quality: median and quartiles of the timed repeats (ms), the
    median of the warm-up calls before them, how many repeats and rounds, and whether it is a result
    (`stable`; `reason` says why not). Built by `judge`, the one place that decides."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    warmup_median_ms: float | None
    n: int
    stable: bool
    reason: str = ""
    rounds: int = 1
    repeats_ms: tuple = ()
    warmup_ms: tuple = ()

    @classmethod
    def judge(cls, repeats_ms: Sequence[float], warmup_ms: Sequence[float] = (), *, max_spread: float = SPREAD_LIMIT,
              max_warmup_ratio: float = WARMUP_LIMIT, rounds: int = 1) -> "LatencyMeasurement":
        """The measurement of these per-call times: unstable when the repeats' interquartile range
        exceeds `max_spread` x their median, or when the warm-up calls' median and the repeats'
        median differ by more than `max_warmup_ratio` times (either way). The warm-up calls never
        count in the median."""
        repeats, warmup = tuple(float(t) for t in repeats_ms), tuple(float(t) for t in warmup_ms)
        if not repeats:
            raise ValueError("a latency needs at least one timed repeat")
        q1, median, q3 = _quartiles(repeats)
        warm = statistics.median(warmup) if warmup else None
        reasons = []
        spread = _relative(q3 - q1, median)
        if spread > max_spread:
            reasons.append(f"spread {spread:.0%}")
        if warm is not None:
            ratio = max(_relative(warm, median), _relative(median, warm))
            if ratio > max_warmup_ratio:
                reasons.append(f"warm-up {_relative(warm, median):.2g}x steady")
        return cls(median_ms=median, q1_ms=q1, q3_ms=q3, min_ms=min(repeats), warmup_median_ms=warm, n=len(repeats),
                   stable=not reasons, reason=", ".join(reasons), rounds=rounds, repeats_ms=repeats, warmup_ms=warmup)

    @property
    def spread(self) -> float:
        """Interquartile range of the repeats over their median."""
        return _relative(self.q3_ms - self.q1_ms, self.median_ms)

    @property
    def warmup_ratio(self) -> float | None:
        """Median of the warm-up calls over the median of the repeats (None without warm-up calls)."""
        return None if self.warmup_median_ms is None else _relative(self.warmup_median_ms, self.median_ms)

    def describe(self, digits: int = 1) -> str:
        """``12.3 ms``, or ``unstable (spread 35%)`` for a latency that is no result."""
        return f"{self.median_ms:.{digits}f} ms" if self.stable else f"unstable ({self.reason})"

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms, "min_ms": self.min_ms,
                "spread": self.spread, "warmup_median_ms": self.warmup_median_ms, "warmup_ratio": self.warmup_ratio,
                "n": self.n, "rounds": self.rounds, "stable": self.stable, "reason": self.reason,
                "repeats_ms": list(self.repeats_ms), "warmup_ms": list(self.warmup_ms)}


@dataclass(frozen=True)
class LatencyMeasurer:
    """Times a group of models side by side and judges each latency (see the module docstring).

    `measure(calls)` takes, per model, a function that runs it once and returns the milliseconds it
    took (a fake clock in tests). Each round: max(`warmup`, `min_warmup`) warm-up calls per model
    (round-robin, timed but never counted), then `repeats` timed calls per model round-robin. When a
    latency of the group is unstable, the whole group is timed again, with twice the warm-up calls
    of the round before, at most `extra_rounds` times; every latency returned comes from the same
    (last) round, so ratios of them compare models timed side by side.
    """

    repeats: int = 5
    warmup: int = MIN_WARMUP
    min_warmup: int = MIN_WARMUP
    max_spread: float = SPREAD_LIMIT
    max_warmup_ratio: float = WARMUP_LIMIT
    extra_rounds: int = EXTRA_ROUNDS

    def __post_init__(self):
        if self.repeats < 1 or self.warmup < 0 or self.min_warmup < 0 or self.extra_rounds < 0:
            raise ValueError(f"repeats={self.repeats} must be >= 1, warmup={self.warmup}, min_warmup="
                             f"{self.min_warmup} and extra_rounds={self.extra_rounds} >= 0")
        if not self.max_spread > 0 or not self.max_warmup_ratio >= 1:
            raise ValueError(f"max_spread={self.max_spread} must be > 0 and max_warmup_ratio="
                             f"{self.max_warmup_ratio} >= 1")

    def warmup_calls(self, round_index: int = 0) -> int:
        """Warm-up calls per model in round `round_index` (0 = the first): doubled each round."""
        base = max(self.warmup, self.min_warmup)
        return base if round_index == 0 else max(base, 1) * 2 ** round_index

    def judge(self, repeats_ms: Sequence[float], warmup_ms: Sequence[float] = (),
              rounds: int = 1) -> LatencyMeasurement:
        return LatencyMeasurement.judge(repeats_ms, warmup_ms, max_spread=self.max_spread,
                                        max_warmup_ratio=self.max_warmup_ratio, rounds=rounds)

    def measure(self, calls: Mapping[str, Callable[[], float]]) -> dict[str, LatencyMeasurement]:
        if not calls:
            return {}
        for r in range(self.extra_rounds + 1):
            warm: dict[str, list[float]] = {name: [] for name in calls}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(self.warmup_calls(r)):
                for name, call in calls.items():
                    warm[name].append(call())
            for _ in range(self.repeats):
                for name, call in calls.items():
                    times[name].append(call())
            out = {name: self.judge(times[name], warm[name], rounds=r + 1) for name in calls}
            if all(m.stable for m in out.values()):
                break
        return out


def measure_latencies(models: dict[str, nn.Module], inputs: ExampleInputs,
                      measurer: LatencyMeasurer | None = None) -> dict[str, LatencyMeasurement]:
    """`measurer.measure` (default `LatencyMeasurer()`) on real models: forward passes in eval mode
    under `torch.inference_mode`, each call timed by `time_call_ms`; the models' own train/eval
    flags come back after."""
    measurer = measurer or LatencyMeasurer()
    cuda = _on_cuda(inputs)
    with torch.inference_mode(), eval_mode(*models.values()):
        calls = {name: (lambda m=model: time_call_ms(lambda: inputs.call(m), cuda)) for name, model in models.items()}
        return measurer.measure(calls)


def interleaved_latency_ms(models: dict[str, nn.Module], inputs: ExampleInputs, *, repeats: int = 5,
                           warmup: int = 2) -> dict[str, dict]:
    """Per model: median, min and every repeat's milliseconds, timed round-robin after `warmup` calls each
    (exactly that many, one round; `LatencyMeasurer` adds a minimum and re-measurement), with the
    measurement's quality (quartiles, spread, warm-up median, `stable`, `reason`).

    Models run in eval mode under `torch.inference_mode`; their own train/eval flags come back after.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    ms = measure_latencies(models, inputs, LatencyMeasurer(repeats=repeats, warmup=warmup, min_warmup=0,
                                                           extra_rounds=0))
    return {name: {**m.to_json(), "repeats_ms": list(m.repeats_ms)} for name, m in ms.items()}


def paired_latency_ratio(a: nn.Module, b: nn.Module, inputs: ExampleInputs, *, pairs: int = 9,
                         warmup: int = MIN_WARMUP, max_spread: float = SPREAD_LIMIT) -> dict:
    """Time of `a` over time of `b`, measured as back-to-back pairs whose order alternates (a b, b a,
    a b, ...): the median of the per-pair ratios, their quartiles and every pair's times; ``spread``
    is the ratios' interquartile range over their median, and ``stable`` says it is within
    `max_spread` (``reason`` says why not).

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
    m = LatencyMeasurement.judge(ratios, max_spread=max_spread)
    return {"ratio_median": m.median_ms, "ratio_q1": m.q1_ms, "ratio_q3": m.q3_ms, "pairs": pairs, "pairs_ms": times,
            "spread": m.spread, "stable": m.stable, "reason": m.reason, "warmup": warmup}


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
