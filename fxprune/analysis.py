"""`analyze`: trace, shapes, dependency analysis and structures of a model, as one value.

The analysis is read-only for everyone after it: methods train private copies of it
(`fxprune.methods.MethodContext.private_copy`), the rewrite and the masked reference copy what
they change. Its graph module shares its submodules with the analysed model.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from fxprune.passes.dependency import ChannelAnalysis, analyze_dependencies
from fxprune.passes.structures import Structures, find_structures

from . import report as _report
from .arguments import grouped_option, heads_option, layernorm_option, module_selectors
from .errors import ConfigError
from .hooks import carry_root_hooks
from .models import model_source, shape_digest
from .passes.cost import CostModel
from .passes.inputs import ExampleInputs
from .passes.shapes import propagate
from .passes.tracer import TracedModel, trace


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


def with_grouped(analysis: ModelAnalysis, grouped: str, heads: str = "whole",
                 layernorm: str = "boundary") -> ModelAnalysis:
    """The analysis with grouped convs pruned as `grouped` says, nn.MultiheadAttention as `heads`
    says and LayerNorm over the channel dim as `layernorm` says ("whole", "whole" and "boundary"
    return it unchanged): the channel groups, structures and cost of the same traced graph,
    analysed once more. ``layernorm="prune"`` is not function-preserving (`compress`)."""
    grouped, heads, layernorm = grouped_option(grouped), heads_option(heads), layernorm_option(layernorm)
    if (grouped == analysis.options.get("grouped", "whole") and heads == analysis.options.get("heads", "whole")
            and layernorm == analysis.options.get("layernorm", "boundary")):
        return analysis
    t0 = time.perf_counter()
    channels = analyze_dependencies(analysis.traced.graph_module, ignore=analysis.options.get("ignore", ()),
                                    auto_leaves=analysis.traced.auto_leaves, grouped=grouped, heads=heads,
                                    layernorm=layernorm)
    structures = find_structures(channels)
    timings = {**analysis.timings, "analysis": analysis.timings.get("analysis", 0.0) + time.perf_counter() - t0}
    return dataclasses.replace(analysis, channels=channels, structures=structures, cost=CostModel(channels),
                               timings=timings, options={**analysis.options, "grouped": grouped, "heads": heads,
                                                         "layernorm": layernorm})
