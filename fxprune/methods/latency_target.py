"""What every method does with a latency target: measure a plan's slim model the way the latency
model was measured, and report predicted and measured latency before and after."""
from __future__ import annotations

from fxprune.distributed import run_on_rank0
from fxprune.latency_model import measure_model, measure_models
from fxprune.latency_model.profile import batched
from fxprune.passes.plan import PruningPlan
from fxprune.passes.rewrite import apply_plan

from .base import MethodContext
from .latency_selection import predict_plan


def _compiled(mode: str | None) -> str:
    return "" if mode is None else ", compiled" if mode == "default" else f", compiled ({mode})"


def latency_details(latency_model, context: MethodContext, plan: PruningPlan, measured_after_s: float,
                    extra: dict | None = None) -> dict:
    """The report's latency entry: where it was measured, predicted and measured before and after."""
    on = context.measure_on
    return {"on": f"{on.device}, batch {on.batch or 'as given'}, {str(on.dtype or 'model dtype').replace('torch.', '')}"
                  f"{', channels_last' if on.channels_last else ''}{_compiled(on.compile)}",
            "predicted_before_s": latency_model.predict({}), "measured_before_s": latency_model.original_s,
            "predicted_after_s": predict_plan(latency_model, plan, context.analysis.channels),
            "measured_after_s": measured_after_s,
            "target_s": context.constraints.latency_target_s(latency_model.original_s),
            "after_measured": ("side by side with the original, scaled to the profiled original"
                               if context.constraints.latency is not None else "alone"), **(extra or {})}


def slim_latency(context: MethodContext, plan: PruningPlan, latency_model=None) -> float:
    """End-to-end seconds of the slim model `plan` makes, measured as the latency model was.

    With a fractional target (`latency=`) and `latency_model` given, the original (its traced
    graph: the same module form as the slim model) is timed side by side with the slim model and
    the slim time is scaled to the profile's original: slim now / original now x original
    profiled. A profile cached from a quieter or busier hour then neither accepts a miss nor
    refuses a hit: the target is judged on the ratio measured now.

    Under torchrun, rank 0 measures (the other ranks wait, so they neither disturb its timing nor
    time on their own) and every rank gets its seconds: a decision taken on them is the same on
    every rank (`fxprune.distributed.run_on_rank0`); a collective, so every rank calls it."""
    return run_on_rank0(lambda: _measured_slim_s(context, plan, latency_model))


def _measured_slim_s(context: MethodContext, plan: PruningPlan, latency_model) -> float:
    """`slim_latency` on this process: the slim model timed alone, or side by side and scaled."""
    on, analysis = context.measure_on, context.analysis
    slim = apply_plan(analysis.channels, plan)
    x = batched(analysis.inputs, on.batch)
    how = dict(device=on.device, dtype=on.dtype, channels_last=on.channels_last, compile=on.compile)
    if latency_model is None or context.constraints.latency is None:
        return measure_model(slim, x, **how)
    slim_s, original_s = measure_models([slim, analysis.channels.gm], x, **how)
    return slim_s / original_s * latency_model.original_s
