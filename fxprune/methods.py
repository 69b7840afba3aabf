"""Registry of the data-driven methods: one entry per method, the one driver in `api.compress`.

A method is a name, an options dataclass (built from ``compress(..., options={...})`` with the
call's `seed` as default) and a runner. The runner gets the analysis of a *private copy* of the
user's model (it may train that copy's modules in place), the data, the FLOPs target and the
options, and returns a `MethodResult`: the `PruningPlan` the core rewrite applies, plus whatever
the method wants to report (search history, removed blocks...), stored in the report's `details`.

Example::

    >>> register_method("my_method", MyOptions, run_my_method)
    >>> fxprune.compress(model, "my_method", x, 0.5, data=loader, options={"epochs": 3})
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from passes.rewrite import PruningPlan

from .errors import ConfigError


@dataclass
class MethodResult:
    plan: PruningPlan
    details: dict = field(default_factory=dict)


@dataclass
class MethodSpec:
    name: str
    options: type  # a dataclass; unknown keys are a ConfigError
    run: Callable[..., MethodResult]  # run(analysis, data, flops, opts, *, targets_from, selection) -> MethodResult
    supports_latency: bool = False  # selection["latency"] (seconds) is honoured


DATA_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, options: type, run: Callable[..., MethodResult], *,
                    supports_latency: bool = False) -> None:
    DATA_METHODS[name] = MethodSpec(name, options, run, supports_latency)


def make_options(spec: MethodSpec, options: dict | Any | None, seed: int):
    """The method's options object from a dict (or an instance, passed through)."""
    if isinstance(options, spec.options):
        return options
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown {spec.name} option(s) {', '.join(unknown)}: known options are "
                          f"{', '.join(sorted(known))}")
    if "seed" in known:
        options.setdefault("seed", seed)
    return spec.options(**options)


def _register_builtin() -> None:
    from .gate_decorator import GateDecoratorOptions, run_gate_decorator

    register_method("gate_decorator", GateDecoratorOptions, run_gate_decorator)
    from .gal import GALOptions, run_gal

    register_method("gal", GALOptions, run_gal)
    from .metapruning import MetaPruningOptions, run_metapruning

    register_method("metapruning", MetaPruningOptions, run_metapruning, supports_latency=True)


_register_builtin()
