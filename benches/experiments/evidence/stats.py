"""Mean and 95 % confidence intervals over seeds, and paired differences between methods.

Intervals use Student's t (two-sided 95 %) with n - 1 degrees of freedom: with 3 seeds the
half-width is 4.30 standard errors, which is what makes "non-overlapping intervals" a demanding
test. A paired difference compares two methods seed by seed (the same baseline network, data order
and fine-tune seed), which removes the baseline's seed-to-seed spread from the comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# two-sided 95 % quantiles of Student's t, degrees of freedom 1..30 (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    """mean ± half (95 %), over n values; half is inf for a single value."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def apart_from(self, other: Interval) -> int:
        """+1 when this interval lies wholly above `other`, -1 wholly below, 0 when they overlap."""
        if self.low > other.high:
            return 1
        if self.high < other.low:
            return -1
        return 0

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1 or not math.isfinite(self.half):
            return f"{self.mean * scale:.{digits}f} (n=1)"
        return f"{self.mean * scale:.{digits}f} ± {self.half * scale:.{digits}f}"


def mean_ci(values) -> Interval:
    """Mean and 95 % half-width of `values` (sample standard deviation, t quantile)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.inf, 0)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.inf, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t975(n - 1) * sd / math.sqrt(n), n)


def paired(a: dict, b: dict) -> Interval:
    """Interval of a[seed] - b[seed] over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    return mean_ci([a[s] - b[s] for s in seeds])
