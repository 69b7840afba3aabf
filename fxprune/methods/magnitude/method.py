"""The magnitude method: rank units by a criterion, keep the best under the budget, no data.

``l1``, ``l2``, ``bn_scale``, ``random`` rank every unit of every group together (after per-group
normalisation) and keep the most important under the FLOPs budget; ``uniform`` ranks by l1 inside
each group and keeps one shared ratio everywhere (`fxprune.methods.selection`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodContext, MethodResult
from ..selection import select
from .criteria import BNScale, Criterion, Norm, RandomScore


@dataclass(frozen=True)
class MagnitudeMethod:
    """A data-free method: one `Criterion`, global or uniform allocation."""

    name: str
    criterion: Criterion
    uniform: bool = False
    options_type = None
    supports = frozenset({"round_to", "min_channels", "min_ratio"})
    needs_data = False

    def run(self, context: MethodContext) -> MethodResult:
        analysis, c = context.analysis, context.constraints
        scores = self.criterion.scores(analysis.channels, context.seed)
        plan = select(analysis.channels, analysis.cost, scores, c, uniform=self.uniform)
        return MethodResult(plan)


MAGNITUDE_METHODS = (
    MagnitudeMethod("l1", Norm(1)),
    MagnitudeMethod("l2", Norm(2)),
    MagnitudeMethod("bn_scale", BNScale()),
    MagnitudeMethod("random", RandomScore()),
    MagnitudeMethod("uniform", Norm(1), uniform=True),
)
