"""Typed errors. Each message names the problem and the fix, so a batch job can log it and go on."""
from __future__ import annotations

import math
from typing import Any


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class ConfigError(FxpruneError, ValueError):
    """An argument has a value fxprune cannot use (unknown method, `flops` outside (0, 1], ...)."""


class InputError(FxpruneError, ValueError):
    """The example inputs do not fit the model (wrong shape, dtype or structure)."""


class TraceError(FxpruneError, RuntimeError):
    """torch.fx could not trace the model, not even with untraceable submodules turned into leaves.

    Attributes:
        module_path: qualified name of the module whose code failed ("" for the root).
        reason: the message torch.fx (or the model's own code) raised.
    """

    def __init__(self, module_path: str, reason: str):
        self.module_path = module_path
        self.reason = reason
        where = f"module '{module_path}'" if module_path else "the model's own forward()"
        super().__init__(
            f"cannot trace {where}: {reason}\n"
            "Remedy: pass leaf_modules=[...] (module types or qualified names) to keep untraceable "
            "submodules whole, or concrete_args={'flag': value} to fix Python-level control flow "
            "on non-tensor arguments."
        )


class NothingToPruneError(FxpruneError):
    """The analysis found no prunable channel group (every channel is behind a boundary)."""


class TargetUnreachableError(FxpruneError):
    """The FLOPs target is below what the prunable groups can reach.

    Attributes:
        target: the requested fraction of the original MACs.
        minimum: the smallest fraction reachable with every prunable group at its minimum.
    """

    def __init__(self, target: float, minimum: float, detail: str = ""):
        self.target = target
        self.minimum = minimum
        super().__init__(
            f"flops={target:.4f} is unreachable: with every prunable group at its minimum size the "
            f"model keeps {minimum:.4f} of its MACs{detail}. Ask for flops >= {minimum:.4f}, lower "
            "min_channels, or remove modules from ignore=."
        )


class VerificationError(FxpruneError):
    """The slim model's outputs differ from the masked original's beyond the tolerance."""

    def __init__(self, max_rel_error: float, tolerance: float, where: str):
        self.max_rel_error = max_rel_error
        self.max_abs_error = max_rel_error  # the name older callers read; it always held the relative error
        self.tolerance = tolerance
        super().__init__(
            f"verification failed: max error relative to the output's magnitude {max_rel_error:.3e} > "
            f"tolerance {tolerance:.3e} "
            f"at output {where}. This is a bug in fxprune's rewrite; please report it with the model. "
            "Pass verify=False to get the model anyway."
        )


class ArtifactError(FxpruneError):
    """A saved artifact is missing, truncated, corrupted or does not match its base model."""


class LatencyUnreachableError(TargetUnreachableError):
    """The latency target is below the best (predicted or measured) latency the rules allow.

    Attributes:
        target_s, best_s: the target and the best latency found, in seconds (also as `target` and
            `minimum`, like MetaPruning's error of the same name).
        original_s: the unpruned model's latency (None when unknown).
        measured: whether best_s was measured end to end (else predicted by the latency model).
        best_measured_s, best_plan, rounds: from `fit_measured` (the smallest measurement, its
            plan, every round's budget / predicted / measured); None / [] otherwise.
    """

    def __init__(self, target_s: float, best_s: float, original_s: float | None = None, detail: str = "", *,
                 measured: bool = False, best_measured_s: float | None = None, best_plan: Any = None,
                 rounds: list[dict] | None = None):
        self.target_s, self.best_s, self.original_s, self.detail = target_s, best_s, original_s, detail
        self.target, self.minimum = target_s, best_s
        self.measured, self.best_measured_s, self.best_plan = measured, best_measured_s, best_plan
        self.rounds = list(rounds or [])
        kind = "measured" if measured else "predicted"
        Exception.__init__(
            self, f"latency {_ms(target_s, original_s)} is unreachable: the best {kind} latency is "
                  f"{_ms(best_s, original_s)}{detail}. Ask for latency >= {best_s * 1e3:.4f} ms, lower "
                  "min_channels / min_ratio, or remove modules from ignore=.")

    def __reduce__(self):
        return (type(self), (self.target_s, self.best_s, self.original_s, self.detail), dict(self.__dict__))


def _ms(seconds: float, original_s: float | None) -> str:
    text = f"{seconds * 1e3:.4f} ms"
    if original_s and original_s > 0 and math.isfinite(seconds):
        text += f" ({seconds / original_s:.4f} of the original {original_s * 1e3:.4f} ms)"
    return text
