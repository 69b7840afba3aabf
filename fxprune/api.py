"""The public entry points: `analyze` and `compress`.

Example::

    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18(weights=None).eval()
    >>> slim = fxprune.compress(model, method="l1", example_inputs=torch.randn(1, 3, 224, 224), flops=0.5)
    >>> slim.fxprune_report.macs_ratio <= 0.5
    True
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from passes.dependency import ChannelAnalysis, analyze_dependencies
from passes.mask import masked_reference
from passes.rewrite import PruningPlan, apply_plan, plan_keep_roots, plan_removed_nodes
from passes.structures import Structures, find_structures

from . import report as _report
from .cost import CostModel
from .arguments import module_selectors, real_number, whole_number
from .errors import ConfigError, NothingToPruneError
from .importance import group_scores
from .inputs import ExampleInputs
from .methods import DATA_METHODS, make_options
from .models import model_source, shape_digest
from .recipe import make_recipe
from .selection import select
from .shapes import propagate
from .hooks import carry_root_hooks
from .tracer import TracedModel, trace
from .verify import verify as verify_against

DATA_FREE_METHODS = ("l1", "l2", "bn_scale", "random", "uniform")


def all_methods() -> tuple[str, ...]:
    """Data-free criteria, then every registered data-driven method (`fxprune.methods`)."""
    return (*DATA_FREE_METHODS, *DATA_METHODS)


METHODS = all_methods()  # at import time; registrations made later show in all_methods()


@dataclass
class ModelAnalysis:
    """Everything the compiler knows about a model before a method decides what to prune."""

    traced: TracedModel
    inputs: ExampleInputs
    channels: ChannelAnalysis
    cost: CostModel
    structures: Structures
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # ignore / leaf_modules / concrete_args, for recipes
    source: dict | None = None  # how the base model is built ({"spec": "torchvision:resnet50", ...})
    model_class: str = ""

    @property
    def groups(self):
        return self.channels.groups

    @property
    def boundaries(self):
        return self.channels.boundaries

    def table(self, limit: int | None = None) -> str:
        auto = "".join(f"\nauto leaf {p}: {r}" for p, r in self.traced.auto_leaves.items())
        return (
            f"{_report.groups_table(self.channels, limit)}\n\n{_report.boundaries_table(self.channels)}{auto}\n\n"
            f"params {_report.human(self.cost.total_params)}, MACs {_report.human(self.cost.total_macs)}, "
            f"FLOPs {_report.human(2 * self.cost.total_macs)}; "
            f"{len(self.channels.prunable_groups)}/{len(self.groups)} groups prunable, "
            f"{len(self.structures.residual_branches)} residual branches, "
            f"{len(self.structures.concat_inputs)} droppable concat inputs"
        )

    def __str__(self) -> str:
        return self.table()


def analyze(model: nn.Module, example_inputs: Any, *, ignore: Iterable = (), leaf_modules: Iterable = (),
            concrete_args: dict | None = None) -> ModelAnalysis:
    """Trace, propagate shapes and find the channel groups, boundaries and coarse structures."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ignore = module_selectors(model, ignore, "ignore")
    leaf_modules = module_selectors(model, leaf_modules, "leaf_modules", instances=False, exact=True)
    if concrete_args is not None and not (isinstance(concrete_args, dict)
                                          and all(isinstance(k, str) for k in concrete_args)):
        raise ConfigError(f"concrete_args must be a dict of forward-argument names to values, got {concrete_args!r}")
    inputs = ExampleInputs.normalize(example_inputs)
    t0 = time.perf_counter()
    traced = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    carry_root_hooks(model, traced.graph_module)  # fx traces forward(), not the root's hooks
    t1 = time.perf_counter()
    propagate(traced.graph_module, inputs)
    t2 = time.perf_counter()
    channels = analyze_dependencies(traced.graph_module, ignore=ignore, auto_leaves=traced.auto_leaves)
    structures = find_structures(channels)
    cost = CostModel(channels)
    t3 = time.perf_counter()
    return ModelAnalysis(traced, inputs, channels, cost, structures,
                         {"trace": t1 - t0, "shapes": t2 - t1, "analysis": t3 - t2},
                         {"ignore": list(ignore), "leaf_modules": list(leaf_modules), "concrete_args": concrete_args},
                         model_source(model) or {"spec": None, "kwargs": {}, "fingerprint": shape_digest(model)},
                         f"{type(model).__module__}.{type(model).__qualname__}")


def _check_options(method: str, flops: float, round_to, min_channels, min_ratio) -> None:
    if not isinstance(method, str) or method not in all_methods():
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(all_methods())}")
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops <= 1:  # NaN fails too
        raise ConfigError(
            f"flops={flops!r} must be the fraction of the original FLOPs to keep, in (0, 1] (e.g. 0.5)")
    whole_number(round_to, "round_to", optional=True)
    whole_number(min_channels, "min_channels")
    real_number(min_ratio, "min_ratio", low=0, high=1, high_open=True, example="0.1")


def prune_with_plan(analysis: ModelAnalysis, plan: PruningPlan, *, verify_output: bool = True,
                    tolerance: float | None = None) -> tuple[fx.GraphModule, Any]:
    """Rewrite with `plan` and (optionally) verify against the masked original."""
    slim = apply_plan(analysis.channels, plan)
    slim.training = analysis.traced.graph_module.training
    carry_root_hooks(analysis.traced.graph_module, slim)
    slim.fxprune_recipe = make_recipe(analysis, plan)
    result = None
    if verify_output:
        reference = carry_root_hooks(analysis.traced.graph_module, masked_reference(analysis.channels, plan))
        result = verify_against(reference, slim, analysis.inputs, tolerance)
    return slim, result


def compress(model: nn.Module, method: str = "l1", example_inputs: Any = None, flops: float = 0.5, *,
             round_to: int | None = None, ignore: Iterable = (), leaf_modules: Iterable = (),
             concrete_args: dict | None = None, min_channels: int = 1, min_ratio: float = 0.0,
             verify: bool = True, tolerance: float | None = None, seed: int = 0,
             data: Any = None, options: dict | None = None, latency: float | None = None) -> fx.GraphModule:
    """Return a slim copy of `model` keeping at most `flops` of its FLOPs.

    Args:
        method: importance criterion, one of ``METHODS`` (data-free).
        example_inputs: a tensor, tuple of positional args or dict of keyword args.
        flops: fraction of the original FLOPs (= MACs) the result may keep, in (0, 1].
        round_to: keep channel counts multiples of this (per group, e.g. 8 for tensor cores).
        ignore: modules (qualified names, globs, types or instances) whose channels must stay.
        leaf_modules: module types or names to trace as opaque leaves (their channels stay).
        concrete_args: fixed values for non-tensor forward arguments (passed to torch.fx).
        min_channels / min_ratio: each group keeps at least this many / this fraction of channels.
        verify: compare with the masked original on random inputs and raise if they differ.
        tolerance: relative tolerance of the verification (default by dtype: 1e-4 for fp32).
        data: training batches for data-driven methods (``gate_decorator``): (inputs, targets) pairs,
            or bare inputs, which the original model then labels.
        latency: a latency limit in seconds on the current device, for methods that search under one
            (``metapruning``); the FLOPs target applies as well (pass ``flops=1.0`` for latency only).
        options: method options, a dict or the method's options object (``gate_decorator``:
            ``fxprune.gate_decorator.GateDecoratorOptions``; ``gal``: ``fxprune.gal.GALOptions``).

    The returned GraphModule has the model's dtype, device and train/eval mode; its
    ``fxprune_report`` attribute holds the before/after numbers. The input model is not modified.
    """
    _check_options(method, flops, round_to, min_channels, min_ratio)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data_driven = method not in DATA_FREE_METHODS
    if latency is not None and not (data_driven and DATA_METHODS[method].supports_latency):
        able = [n for n, m in DATA_METHODS.items() if m.supports_latency]
        raise ConfigError(f"method {method!r} has no latency constraint: use flops=, or one of {able or 'none'}")
    if latency is not None and (isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency <= 0):
        raise ConfigError(f"latency={latency!r} must be a positive number of seconds")
    t0 = time.perf_counter()
    work = copy.deepcopy(model) if data_driven else model  # data-driven methods train their copy
    analysis = analyze(work, example_inputs, ignore=ignore, leaf_modules=leaf_modules,
                       concrete_args=concrete_args)
    analysis.source = model_source(model) or analysis.source  # the copy has no spec of its own
    if not analysis.channels.prunable_groups:
        reason = _report.main_boundary_reason(analysis.channels)
        raise NothingToPruneError(
            f"{type(model).__name__} has no prunable channel group ({len(analysis.groups)} groups, all fixed; "
            f"main reason: {reason or 'no conv/linear layers found'}). Check ignore= and leaf_modules=, "
            "or run fxprune.analyze(model, x) to see every boundary.")
    t1 = time.perf_counter()
    details = {}
    if data_driven:
        spec = DATA_METHODS[method]
        opts = make_options(spec, options, seed)
        outcome = spec.run(analysis, data, flops, opts, targets_from=model,
                           selection={"round_to": round_to, "min_channels": min_channels, "min_ratio": min_ratio,
                                      "latency": latency})
        plan, details = outcome.plan, outcome.details
    else:
        scores = group_scores(analysis.channels, method, seed)
        plan = select(analysis.channels, analysis.cost, scores, flops, min_channels=min_channels,
                      min_ratio=min_ratio, round_to=round_to, uniform=method == "uniform")
    t2 = time.perf_counter()
    slim, result = prune_with_plan(analysis, plan, verify_output=False)
    t3 = time.perf_counter()
    if verify:
        reference = carry_root_hooks(analysis.traced.graph_module, masked_reference(analysis.channels, plan))
        result = verify_against(reference, slim, analysis.inputs, tolerance)
    t4 = time.perf_counter()
    keep = plan_keep_roots(analysis.channels, plan)
    removed = plan_removed_nodes(analysis.channels, plan)
    slim.fxprune_report = _report.CompressionReport(
        model=type(model).__name__, method=method, target_flops=flops,
        params_before=int(analysis.cost.total_params), params_after=sum(p.numel() for p in slim.parameters()),
        macs_before=int(analysis.cost.total_macs), macs_after=int(round(analysis.cost.macs(keep, removed))),
        max_abs_error=None if result is None else result.max_abs_error,
        max_rel_error=None if result is None else result.max_rel_error,
        groups=len(analysis.groups), prunable_groups=len(analysis.channels.prunable_groups),
        boundaries=list(analysis.boundaries),
        timings={**analysis.timings, "method": t2 - t1, "rewrite": t3 - t2, "verify": t4 - t3, "total": t4 - t0},
        details=details,
    )
    return slim

