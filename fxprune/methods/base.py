"""The one method protocol: data-free and data-driven methods alike.

A method is an object with a `name`, an `options_type` (a dataclass, or None when it takes no
options), the constraints it `supports` beyond `flops`, whether it `needs_data`, and
`run(context) -> MethodResult`. `compress` is the only driver: it validates the constraints
against `supports`, builds the options, analyses the model and calls `run` once.

A method returns a value. It never writes into the analysis it is given or into the user's model:
whatever it trains, it trains on its own copy (`MethodContext.private_copy`), and it hands back the
plan (every graph edit the rewrite must replay) plus the new values of the analysed model's
tensors (`MethodResult.weights`), which the rewrite takes in place of the analysed ones.

Example (a method of one's own)::

    >>> class KeepFirst:
    ...     name, options_type, supports, needs_data = "keep_first", None, frozenset(), False
    ...     def run(self, ctx):
    ...         return MethodResult(PruningPlan(keep={g.index: range(g.n_units // 2)
    ...                                              for g in ctx.analysis.channels.prunable_groups}))
    >>> register_method(KeepFirst())
    >>> fxprune.compress(model, "keep_first", x, flops=1.0)
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fxprune.constraints import Constraints, MeasureOn
from fxprune.errors import ConfigError
from fxprune.passes.plan import PruningPlan


@dataclass
class MethodResult:
    """What a method decided: the plan, the new tensor values (trained methods), what to report."""

    plan: PruningPlan
    details: dict = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None  # qualified name in the analysed model -> new value


@dataclass
class MethodContext:
    """Everything a method may read. `analysis` and `original` are read-only."""

    analysis: Any  # fxprune.api.ModelAnalysis
    constraints: Constraints
    options: Any
    data: Any = None
    original: nn.Module | None = None  # the user's model: a baseline / labeller, never trained
    seed: int = 0
    measure_on: MeasureOn = field(default_factory=MeasureOn)  # where latency constraints are measured

    def private_copy(self):
        """A copy of the analysis whose graph module (and so every module and tensor) is the
        method's own to train; the shape metadata and channel groups are shared read-only."""
        gm = copy.deepcopy(self.analysis.traced.graph_module)
        channels = dataclasses.replace(self.analysis.channels, gm=gm)
        traced = dataclasses.replace(self.analysis.traced, graph_module=gm)
        return dataclasses.replace(self.analysis, traced=traced, channels=channels)  # the cost model only counts


@runtime_checkable
class Method(Protocol):
    name: str
    options_type: type | None
    supports: frozenset  # constraint names honoured beyond flops (see fxprune.constraints)
    needs_data: bool

    def run(self, context: MethodContext) -> MethodResult: ...


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` available to `compress(..., method=method.name)`; returns it."""
    if not isinstance(method, Method):
        raise ConfigError(f"{method!r} is not a method: it needs name, options_type, supports, needs_data and run()")
    METHODS[method.name] = method
    return method


def get_method(name: Any) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_options(method: Method, options: Any, seed: int):
    """The method's options object from a dict (or an instance, passed through)."""
    if method.options_type is None:
        if options:
            raise ConfigError(f"method {method.name!r} takes no options, got {options!r}")
        return None
    if isinstance(options, method.options_type):
        return options
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"options must be a dict or a {method.options_type.__name__}, got {type(options).__name__}")
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(method.options_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown {method.name} option(s) {', '.join(unknown)}: known options are "
                          f"{', '.join(sorted(known))}")
    if "seed" in known:
        options.setdefault("seed", seed)
    return method.options_type(**options)
