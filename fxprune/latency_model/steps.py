"""Pure numerics of the latency model: staircases, envelopes, separable tables, fast lookup.

- `monotone_envelope`: the non-decreasing least-squares fit of a noisy time curve (median of 3,
  then pool adjacent violators). A layer with more channels never runs faster; a sample that says
  so is noise.
- `detect_steps`: the lower edges of a staircase-like curve (the last count of each step).
- `step_intervals`: the intervals of a coarse grid where a step hides (a jump much steeper than the
  curve's median slope): the only places worth bisecting.
- `estimate_alpha` / `separable`: the 2-D time of a layer from its two 1-D curves (module
  `fxprune.latency_model` docstring, "Separable tables").
- `Curves`: many piecewise curves evaluated at once (one `searchsorted` for all), so `predict` on
  a resnet50 costs tens of microseconds.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np


def monotone_envelope(times) -> np.ndarray:
    """The non-decreasing sequence closest to `times` in least squares (pool adjacent violators),
    after a median of 3 neighbours at every inner sample: one outlier (a call slowed by another
    process) is replaced by a neighbour instead of being averaged into its whole step. A monotone
    sequence is its own median of 3, so a clean staircase or ramp is left exactly as it is."""
    y = np.asarray(times, dtype=np.float64).ravel()
    if len(y) > 2:
        y = np.concatenate([y[:1], np.median(np.stack([y[:-2], y[1:-1], y[2:]]), axis=0), y[-1:]])
    means, sizes = [], []
    for v in y:
        means.append(float(v))
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            n = sizes[-2] + sizes[-1]
            m = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / n
            means[-2:], sizes[-2:] = [m], [n]
    return np.repeat(np.asarray(means), sizes) if means else np.zeros(0)


def _checked(counts, times) -> tuple[np.ndarray, np.ndarray]:
    c, t = np.asarray(counts).ravel(), np.asarray(times, dtype=np.float64).ravel()
    if len(c) != len(t):
        raise ValueError(f"counts and times differ in length ({len(c)} != {len(t)})")
    if len(c) > 1 and not np.all(np.diff(c) > 0):
        raise ValueError("counts must be strictly ascending")
    if not np.all(np.isfinite(t)):
        raise ValueError("times must be finite")
    return c, t


def detect_steps(counts: np.ndarray, times: np.ndarray, *, rel_jump: float = 0.05) -> np.ndarray:
    """Ascending channel counts that are the LOWER EDGES of the steps of a staircase-like time curve
    (a count c is a lower edge when time(c) is clearly below time(next count): keeping c is as cheap as
    anything in its step). Pure function, robust to noise (monotone envelope first).

    The rule, on the envelope e (`monotone_envelope`): a step starts at a count s and takes every
    following count c with e(c) <= e(s) x (1 + rel_jump) (+ 1e-12 of the curve's scale, for
    exact ties); its last count is a lower edge and the next count starts the next step. The last
    count is always an edge (the top of the last step). A clean staircase with jumps above
    `rel_jump` gives exactly the counts before each jump; a flat curve gives the last count only;
    a ramp gives one edge per `rel_jump` of time (every count, when the samples are coarser than
    that); noise below `rel_jump` inside a step moves nothing.
    """
    c, t = _checked(counts, times)
    if rel_jump < 0:
        raise ValueError(f"rel_jump={rel_jump} must be >= 0")
    if len(c) == 0:
        return c.copy()
    env = monotone_envelope(t)
    tiny = 1e-12 * max(float(np.max(np.abs(env))), 1e-300)
    edges, start = [], 0
    for i in range(len(c) - 1):
        if env[i + 1] > env[start] + rel_jump * abs(env[start]) + tiny:
            edges.append(i)
            start = i + 1
    edges.append(len(c) - 1)
    return c[np.asarray(edges, dtype=np.int64)]


def step_intervals(counts, times, *, rel_jump: float = 0.05, steepness: float = 2.0, limit: int = 2) -> list[int]:
    """Indices j of the grid intervals [counts[j], counts[j+1]] that hide a step: the envelope jumps
    by more than `rel_jump` there and `steepness` x more steeply than the median interval (a ramp,
    however coarse, has no such interval). The `limit` steepest, ascending."""
    c, t = _checked(counts, times)
    if len(c) < 2:
        return []
    env = monotone_envelope(t)
    jumps = np.diff(env)
    slopes = jumps / np.diff(c).astype(np.float64)
    base = float(np.median(slopes))
    found = []
    for j, (jump, slope) in enumerate(zip(jumps, slopes)):
        if jump > rel_jump * abs(env[j]) and slope > steepness * base:
            found.append((slope / base if base > 0 else math.inf, j))
    found.sort(reverse=True)
    return sorted(j for _, j in found[:limit])


def estimate_alpha(full: float, corners: Sequence[tuple[float, float, float]], floor: float) -> float:
    """The constant part alpha of a layer's time for the separable model
    t(i, o) = alpha + (T - alpha) x (t(i, O) - alpha) / (T - alpha) x (t(I, o) - alpha) / (T - alpha).

    Each corner (A, B, C) = (t(i, O), t(I, o), t(i, o)) measured off the axes solves the model for
    alpha: (C - a)(T - a) = (A - a)(B - a), so a = (AB - CT) / (A + B - C - T); the median of the
    corners' solutions, kept in [-4 T, floor) (`floor`: the smallest time on the two axes, so that
    every ratio stays >= 0 and the product stays monotone). No usable corner: 0 (a plain product).
    """
    values = []
    for a, b, c in corners:
        den = a + b - c - full
        if abs(den) > 1e-9 * max(abs(full), 1e-300):
            values.append((a * b - c * full) / den)
    if not values:
        return 0.0
    alpha = statistics.median(values)
    top = floor - 1e-9 * max(abs(full), 1e-300)
    return float(min(max(alpha, -4.0 * full), top))


def separable(a, b, alpha, t_in, t_out):
    """t(i, o) from the axis times a = t(i, O) and b = t(I, o) (arrays or floats), alpha, and the two
    axes' times at full size t_in = t(I, O) on the input axis, t_out on the output axis (the same
    measurement, apart from the envelope each axis' noise gets): alpha + (T - alpha) x ratio_in x
    ratio_out with T their mean. A ratio whose axis has no span above alpha is 1."""
    full = 0.5 * (t_in + t_out)
    span_in, span_out = t_in - alpha, t_out - alpha
    r_in = np.where(span_in > 0, (a - alpha) / np.where(span_in > 0, span_in, 1.0), 1.0)
    r_out = np.where(span_out > 0, (b - alpha) / np.where(span_out > 0, span_out, 1.0), 1.0)
    return alpha + (full - alpha) * r_in * r_out


class Curves:
    """Piecewise curves y_k(x), each given at ascending x, evaluated many at a time.

    Mode "linear" interpolates linearly (clamped to the ends); mode "ceil" takes the value at the
    smallest grid point >= x (the tile rule: a count between two multiples of 8 runs as the next
    one). `evaluate(ids, xs)` evaluates curve ids[j] at xs[j] for every j in one searchsorted over
    the concatenated grids (curve k's x offset by k x a span larger than any grid)."""

    def __init__(self, curves: Sequence[tuple[np.ndarray, np.ndarray, str]]):
        xs = [np.asarray(x, dtype=np.float64) for x, _, _ in curves]
        ys = [np.asarray(y, dtype=np.float64) for _, y, _ in curves]
        top = max((float(np.max(np.abs(x))) for x in xs if len(x)), default=1.0)
        self.span = 4.0 * top + 4.0
        self.start = np.cumsum([0] + [len(x) for x in xs])[:-1].astype(np.int64)
        self.stop = self.start + np.asarray([len(x) for x in xs], dtype=np.int64)
        self.ceil = np.asarray([mode == "ceil" for _, _, mode in curves], dtype=bool)
        self.x = np.concatenate(xs) if xs else np.zeros(0)
        self.y = np.concatenate(ys) if ys else np.zeros(0)
        owner = np.repeat(np.arange(len(xs)), [len(x) for x in xs])
        self.keys = self.x + owner * self.span

    def evaluate(self, ids: np.ndarray, xs: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0)
        lo, hi = self.start[ids], self.stop[ids] - 1
        q = xs + ids * self.span
        right = np.searchsorted(self.keys, q, side="right")
        # ceil: the first grid point >= x
        first_ge = np.clip(np.searchsorted(self.keys, q - 1e-6, side="left"), lo, hi)
        # linear: the segment [j, j+1] around x
        j = np.clip(right - 1, lo, np.maximum(hi - 1, lo))
        j1 = np.minimum(j + 1, hi)
        x0, x1, y0, y1 = self.x[j], self.x[j1], self.y[j], self.y[j1]
        width = np.where(x1 > x0, x1 - x0, 1.0)
        w = np.clip((xs - x0) / width, 0.0, 1.0)
        linear = y0 + w * (y1 - y0)
        return np.where(self.ceil[ids], self.y[first_ge], linear)


__all__ = ["Curves", "detect_steps", "estimate_alpha", "monotone_envelope", "separable", "step_intervals"]
