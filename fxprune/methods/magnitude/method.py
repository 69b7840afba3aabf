"""The magnitude method: rank units by a criterion, keep the best under the budget, no data.

``l1``, ``l2``, ``bn_scale``, ``random`` rank every unit of every group together (after per-group
normalisation) and keep the most important under the FLOPs budget; ``uniform`` ranks by l1 inside
each group and keeps one shared ratio everywhere (`fxprune.methods.selection`).

With a latency target (`latency=` a fraction of the measured original, or `latency_ms=`) the
ranked methods profile the model on the device it will run on (`fxprune.latency_model`), keep the
most importance under the predicted latency with every group on a step edge
(`latency_selection.select_under_latency`; ``uniform``: the largest shared fraction of every
group, each on a step edge), then measure the slim model end to end and shrink the
predicted budget until the measurement is under the target (`fit_measured`). With `blocks=True`
the ranked methods' selection may also remove whole residual blocks (`removable_branches`). With
`round_to="auto"` a FLOPs-target selection is moved onto the latency model's step edges
(`snap_to_steps`), or, when the latency model predicts it faster per MAC kept, re-allocated time
first (`allocate_for_speed`); `auto_round` compares the two. The report's details carry predicted and measured latency before and after.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from fxprune.latency_model import profile_latency

from ..base import MethodContext, MethodResult
from ..latency_selection import GROW_ROUNDS, auto_round, fit_measured, select_under_latency
from ..latency_target import latency_details, slim_latency
from ..selection import select
from .criteria import BNScale, Criterion, Norm, RandomScore


@dataclass(frozen=True)
class MagnitudeMethod:
    """A data-free method: one `Criterion`, global or uniform allocation."""

    name: str
    criterion: Criterion
    uniform: bool = False
    options_type = None
    needs_data = False

    @property
    def supports(self) -> frozenset:
        """`blocks` (removing residual blocks under a latency target) for the ranked methods only:
        `uniform` keeps one fraction of every group, and so every block."""
        return frozenset({"round_to", "min_channels", "min_ratio", "latency"} | (set() if self.uniform else {"blocks"}))

    def run(self, context: MethodContext) -> MethodResult:
        analysis, c = context.analysis, context.constraints
        scores = self.criterion.scores(analysis.channels, context.seed)
        if not c.has_latency and not c.round_to_auto:
            return MethodResult(select(analysis.channels, analysis.cost, scores, c, uniform=self.uniform))
        model = profile_latency(analysis, **asdict(context.measure_on))
        if not c.has_latency:  # round_to="auto" for a FLOPs target
            plan = select(analysis.channels, analysis.cost, scores, c, uniform=self.uniform)
            plan, compared = auto_round(analysis.channels, analysis.cost, scores, plan, model, c)
            return MethodResult(plan, {"latency": latency_details(model, context, plan, slim_latency(context, plan, model),
                                                                  {"round_to_auto": compared})})
        target = c.latency_target_s(model.original_s)
        fit = fit_measured(
            lambda budget: select_under_latency(analysis.channels, analysis.cost, scores, c, model, budget,
                                                "uniform" if self.uniform else "importance"),
            lambda plan: slim_latency(context, plan, model), target, latency_model=model, channels=analysis.channels,
            grow=GROW_ROUNDS)
        extra = {"rounds": fit.rounds}
        if c.blocks:
            extra["removed_blocks"] = [add for add, _ in fit.plan.remove_branches]
        return MethodResult(fit.plan, {"latency": latency_details(model, context, fit.plan, fit.measured_s, extra)})


MAGNITUDE_METHODS = (
    MagnitudeMethod("l1", Norm(1)),
    MagnitudeMethod("l2", Norm(2)),
    MagnitudeMethod("bn_scale", BNScale()),
    MagnitudeMethod("random", RandomScore()),
    MagnitudeMethod("uniform", Norm(1), uniform=True),
)
