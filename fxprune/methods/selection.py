"""Choose what to keep: global ranking across groups under a MACs budget.

Units of all prunable groups are ranked together by their normalised score. The pruned set is
the k lowest-ranked units (never taking a group below its minimum); k is found by binary search
so that the recounted MACs (rounding included) are at or under the budget with as much kept as
possible. `uniform` instead searches one keep ratio shared by every group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fxprune.constraints import Constraints
from fxprune.errors import TargetUnreachableError
from fxprune.passes.rewrite import PruningPlan


def normalize(scores: np.ndarray) -> np.ndarray:
    """Per-group normalisation (divide by the mean) so groups of different scale compete fairly."""
    mean = scores.mean() if len(scores) else 0.0
    return scores / mean if mean > 0 else np.zeros_like(scores)


@dataclass
class _GroupChoice:
    index: int
    units: np.ndarray  # unit roots
    order: np.ndarray  # unit indices, least important first
    minimum: int  # units kept at least
    step: int  # kept units rounded up to a multiple of this (round_to)


def _choices(analysis, scores, min_channels, min_ratio, round_to) -> list[_GroupChoice]:
    out = []
    for gi, s in scores.items():
        g = analysis.groups[gi]
        width = max(g.unit_channels, 1)
        minimum = max(1, math.ceil(max(min_channels, min_ratio * g.size) / width))
        step = 1 if not round_to else round_to // math.gcd(round_to, width)
        out.append(_GroupChoice(gi, g.units, np.argsort(s, kind="stable"), min(minimum, g.n_units), step))
    return out


def _kept_count(c: _GroupChoice, kept: int) -> int:
    kept = max(kept, c.minimum)
    kept = math.ceil(kept / c.step) * c.step
    return min(kept, len(c.units))


def _keep_array(analysis, choices, kept_counts) -> np.ndarray:
    keep = np.ones(len(analysis.root), dtype=bool)
    for c, kept in zip(choices, kept_counts):
        keep[c.units[c.order[: len(c.units) - kept]]] = False
    return keep


def _plan(choices, kept_counts) -> PruningPlan:
    return PruningPlan(keep={c.index: np.sort(c.order[len(c.units) - k:]) for c, k in zip(choices, kept_counts)})


def _search(fits, lo: int, hi: int) -> int:
    """Smallest k in [lo, hi] with fits(k); fits is monotone (once true, true for larger k)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def select(channels, cost, scores: dict[int, np.ndarray], constraints: Constraints, *,
           uniform: bool = False) -> PruningPlan:
    """A plan whose MACs fit `constraints` (`Constraints.fits_macs`; see module docstring)."""
    total = cost.total_macs
    choices = _choices(channels, scores, constraints.min_channels, constraints.min_ratio, constraints.round_to)
    if not choices:
        return PruningPlan()
    floor = [_kept_count(c, 0) for c in choices]
    minimum = cost.macs(_keep_array(channels, choices, floor))
    if not constraints.fits_macs(minimum, total):
        raise TargetUnreachableError(
            constraints.flops, minimum / total,
            f" ({len(choices)} prunable groups; the rest is fixed by boundaries)")
    fits = lambda counts: constraints.fits_macs(cost.macs(_keep_array(channels, choices, counts)), total)  # noqa: E731
    if uniform:
        return _uniform(choices, fits)
    # every removable unit of every group, least important first (ties: stable by group)
    norm = [normalize(scores[c.index])[c.order[: len(c.units) - c.minimum]] for c in choices]
    group_of = np.concatenate([np.full(len(n), ci, dtype=np.int64) for ci, n in enumerate(norm)])
    group_of = group_of[np.argsort(np.concatenate(norm), kind="stable")]

    def counts(k: int) -> list[int]:
        removed = np.bincount(group_of[:k], minlength=len(choices))
        return [_kept_count(c, len(c.units) - int(r)) for c, r in zip(choices, removed)]

    k = _search(lambda k: fits(counts(k)), 0, len(group_of))
    return _plan(choices, counts(k))


def _uniform(choices, fits) -> PruningPlan:
    def counts(ratio: float) -> list[int]:
        return [_kept_count(c, math.ceil(ratio * len(c.units))) for c in choices]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if fits(counts(mid)):
            lo = mid
        else:
            hi = mid
    return _plan(choices, counts(lo))
