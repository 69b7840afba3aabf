"""Width encoding for MetaPruning: one width variable (a *gene*) per prunable channel group.

The dependency analysis already merges the channels that residual adds couple into one group, so
a ResNet stage's output width is a single variable shared by every block of the stage and by its
shortcut — exactly how the authors tie stage outputs. A gene's choices are kept *unit* counts:
floor(ratio x units) for the ratios 0.10, 0.13, ..., 1.00 by default, raised to the group's
minimum (`min_channels`, `min_ratio`) and rounded up to `round_to` as the core's selection does,
duplicates removed (a 16-channel group has 16 choices, not 31). A genome is a tuple of choice
indices, one per gene. Channels are kept positionally — the first k units of each group — because
MetaPruning crops its generated weights to the first k rows/columns.

Example::

    >>> import numpy as np, torch, fxprune
    >>> from fxprune.nets import resnet20
    >>> a = fxprune.analyze(resnet20(), torch.randn(1, 1, 28, 28))
    >>> enc = build_encoding(a.channels)
    >>> genome = enc.random(np.random.default_rng(0))
    >>> enc.macs(a.cost, genome) < a.cost.total_macs
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fxprune.errors import ConfigError

from .plan import group_choices, kept_count

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis

DEFAULT_RATIOS = tuple(round(0.10 + 0.03 * i, 2) for i in range(31))  # 0.10, 0.13, ..., 1.00


@dataclass
class WidthEncoding:
    """Genes (prunable groups) and their choices of kept unit counts (ascending, distinct)."""

    channels: object = field(repr=False)  # passes.dependency.ChannelAnalysis
    groups: tuple  # group index of each gene
    sizes: tuple  # units of each gene's group
    choices: tuple  # np.ndarray of kept unit counts per gene
    gene_of_root: np.ndarray = field(repr=False)  # element root -> gene (-1: not prunable)

    @property
    def space(self) -> tuple:
        """Number of choices of each gene."""
        return tuple(len(c) for c in self.choices)

    def __len__(self) -> int:
        return len(self.groups)

    def check(self, genome) -> tuple:
        genome = tuple(int(g) for g in genome)
        if len(genome) != len(self.groups) or any(not 0 <= g < n for g, n in zip(genome, self.space)):
            raise ConfigError(f"genome {genome} does not fit the encoding: {len(self.groups)} genes with "
                              f"{self.space} choices")
        return genome

    def counts(self, genome) -> list:
        """Kept units of each gene's group."""
        return [int(c[g]) for c, g in zip(self.choices, genome)]

    def ratios(self, genome) -> np.ndarray:
        """Kept fraction of each gene's group (the PruningNet's input)."""
        return np.asarray([k / n for k, n in zip(self.counts(genome), self.sizes)], dtype=np.float64)

    def keep(self, genome) -> dict:
        """{group index: kept unit indices}: the first k units of every group."""
        return {gi: np.arange(k) for gi, k in zip(self.groups, self.counts(genome))}

    def keep_roots(self, genome) -> np.ndarray:
        return self.channels.keep_roots(self.keep(genome))

    def full(self) -> tuple:
        return tuple(n - 1 for n in self.space)

    def smallest(self) -> tuple:
        return tuple(0 for _ in self.space)

    def uniform(self, ratio: float) -> tuple:
        """Every gene at the largest choice whose kept fraction is at most `ratio` (else its smallest)."""
        out = []
        for c, n in zip(self.choices, self.sizes):
            ok = np.nonzero(c / n <= ratio + 1e-9)[0]
            out.append(int(ok[-1]) if len(ok) else 0)
        return tuple(out)

    def random(self, rng: np.random.Generator, ratio_range: tuple | None = None) -> tuple:
        """A uniformly random genome; `ratio_range=(lo, hi)` limits each gene to choices in it."""
        out = []
        for c, n in zip(self.choices, self.sizes):
            ids = np.arange(len(c))
            if ratio_range is not None:
                r = c / n
                inside = ids[(r >= ratio_range[0] - 1e-9) & (r <= ratio_range[1] + 1e-9)]
                ids = inside if len(inside) else ids[[int(np.argmin(np.abs(r - np.mean(ratio_range))))]]
            out.append(int(rng.choice(ids)))
        return tuple(out)

    def genes_of_ids(self, ids: np.ndarray) -> list:
        """Genes whose channels appear among element ids (a tensor layout or a member)."""
        genes = np.unique(self.gene_of_root[self.channels.root[np.asarray(ids, dtype=np.int64)]])
        return [int(g) for g in genes if g >= 0]

    def macs(self, cost, genome) -> float:
        """MACs of the slim model of `genome`, recounted exactly by the cost model."""
        return float(cost.macs(self.keep_roots(genome)))

    def params(self, cost, genome) -> float:
        return float(cost.params(self.keep_roots(genome)))

    def describe(self, genome) -> list:
        """JSON-plain widths: one row per gene."""
        rows = []
        for gi, k, n in zip(self.groups, self.counts(genome), self.sizes):
            g = self.channels.groups[gi]
            rows.append({"group": int(gi), "leading": g.leading.target, "units": int(n),
                         "kept_units": int(k), "channels": int(g.size), "kept_channels": int(k * g.unit_channels)})
        return rows

    def signature(self) -> tuple:
        """What must match for a PruningNet to be reused with another analysis of the same model."""
        return tuple((gi, self.channels.groups[gi].leading.target, n, tuple(int(v) for v in c))
                     for gi, n, c in zip(self.groups, self.sizes, self.choices))


def build_encoding(channels: ChannelAnalysis, ratios=DEFAULT_RATIOS, *, round_to: int | None = None, min_channels: int = 1,
                   min_ratio: float = 0.0) -> WidthEncoding:
    """One gene per prunable group of `analysis` (a ChannelAnalysis); see the module docstring."""

    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ConfigError(f"width ratios {ratios} must be a non-empty list of fractions in (0, 1]")
    zero = {g.index: np.zeros(g.n_units) for g in channels.prunable_groups}
    picks = group_choices(channels, zero, min_channels, min_ratio, round_to)
    gene_of_root = np.full(len(channels.root), -1, dtype=np.int64)
    groups, sizes, choices = [], [], []
    for gene, c in enumerate(picks):
        n = len(c.units)
        counts = sorted({kept_count(c, math.floor(r * n + 1e-9)) for r in ratios})
        groups.append(c.index)
        sizes.append(n)
        choices.append(np.asarray(counts, dtype=np.int64))
        gene_of_root[c.units] = gene
    return WidthEncoding(channels, tuple(groups), tuple(sizes), tuple(choices), gene_of_root)


def ratio_grid(minimum: float = 0.10, step: float = 0.03, maximum: float = 1.0) -> tuple:
    """Ratios minimum, minimum + step, ..., maximum (the authors' grid by default)."""
    if not 0 < minimum <= maximum <= 1 or step <= 0:
        raise ConfigError(f"ratio grid ({minimum}, {step}, {maximum}) must satisfy 0 < min <= max <= 1, step > 0")
    n = int(math.floor((maximum - minimum) / step + 1e-9))
    grid = [round(minimum + i * step, 6) for i in range(n + 1)]
    if grid[-1] < maximum - 1e-9:
        grid.append(maximum)
    return tuple(grid)


__all__ = ["DEFAULT_RATIOS", "WidthEncoding", "build_encoding", "ratio_grid"]
