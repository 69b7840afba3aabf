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

import numpy as np
import torch.fx as fx
from torch import nn

from fxprune.passes.context import Layout
from fxprune.passes.ops.attention import MultiheadAttentionModule
from fxprune.passes.ops.conv import WEIGHT_SOURCE, ConvFunction, ConvModule
from fxprune.passes.ops.mvit_attention import MultiscaleAttentionModule
from fxprune.passes.ops.registry import get_arg, get_attr_target, handler_for
from fxprune.passes.ops.reshape import SPLIT
from fxprune.passes.ops.window_attention import RelativePositionalAttentionModule, ShiftedWindowAttentionFunction
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


# The structures `group_structures` reports, in the order it lists them.
STRUCTURE_KINDS = ("split", "grouped_equal", "heads", "computed_weight")


def _head_handlers() -> tuple:
    """The handler classes of the attention ops whose heads are channel groups."""
    return MultiheadAttentionModule, ShiftedWindowAttentionFunction, RelativePositionalAttentionModule, \
        MultiscaleAttentionModule


def _layout_ids(lay: Any) -> list:
    """The element-id arrays of a layout (a Layout, or a tuple of them for a multi-output node)."""
    if isinstance(lay, Layout):
        return [lay.ids]
    if isinstance(lay, (tuple, list)):
        return [ids for item in lay for ids in _layout_ids(item)]
    return []


def group_structures(analysis: ModelAnalysis | ChannelAnalysis) -> dict[int, frozenset]:
    """The channel groups that carry a structure, {group index: kinds} (groups with none are left
    out). Read-only: it looks at the analysis' members, layouts and node meta, and changes nothing.

    The kinds (`STRUCTURE_KINDS`), each a way a group became prunable beyond plain per-channel
    coupling (issue 17, "structured channel groups"):

    * ``"split"``: a reshape splits the group's channel dim into g blocks of width w, which keep the
      same positions (`passes.ops.reshape`, node meta ``SPLIT``: channel shuffle, split attention).
    * ``"grouped_equal"``: the input or output channels of a grouped conv pruned with the same
      positions in every group (``grouped="equal"``, or ``"auto"`` where the groups are wide enough;
      `passes.ops.conv`). A grouped conv that loses whole groups (``"whole"``) is no such structure.
    * ``"heads"``: attention heads (whole heads, or the per-head widths of nn.MultiheadAttention, Swin and MaxViT with
      ``heads="width"``): the groups of the members an attention op registers other than those of
      its input stream (query/key/value, or its first argument) and output stream
      (`passes.ops.attention`, `window_attention`, `mvit_attention`).
    * ``"computed_weight"``: the output channels of a conv whose weight is computed from a parameter
      (weight standardisation; `passes.ops.conv`, node meta ``WEIGHT_SOURCE`` on a functional conv).

    A group may carry several kinds; non-prunable groups are reported too (heads that stay because
    of a mask, say): intersect with the plan's pruned groups to ask what a cut came from.

    Example::

        >>> import torch, torchvision, fxprune
        >>> from fxprune.analysis import group_structures
        >>> a = fxprune.analyze(torchvision.models.shufflenet_v2_x0_5(), torch.randn(1, 3, 64, 64))
        >>> sorted({k for kinds in group_structures(a).values() for k in kinds})
        ['split']
    """
    channels = getattr(analysis, "channels", analysis)
    gm = channels.gm
    group_of = np.full(len(channels.root), -1, dtype=np.int64)
    for g in channels.groups:
        group_of[g.units] = g.index

    def groups_of(ids) -> set:
        found = np.unique(group_of[channels.root[np.asarray(ids, dtype=np.int64)]])
        return {int(g) for g in found if g >= 0}

    kinds: dict[int, set] = {}

    def tag(ids, kind: str, exclude: set = frozenset()) -> None:
        for g in groups_of(ids) - exclude:
            kinds.setdefault(g, set()).add(kind)

    by_node: dict[str, list] = {}
    for m in channels.members.values():
        by_node.setdefault(m.node, []).append(m)
    heads = _head_handlers()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        lay = channels.layouts.get(node.name)
        if SPLIT in node.meta and isinstance(lay, Layout):
            tag(lay.ids, "split")
        handler = handler_for(node, gm)
        if isinstance(handler, heads):
            stream = set()  # the groups of its input and output stream, which are no heads
            data = [get_arg(node, i, n) for i, n in ((0, "query"), (1, "key"), (2, "value"))] \
                if isinstance(handler, heads[0]) else [node.args[0] if node.args else next(iter(node.kwargs.values()))]
            for ids in [i for arg in data if isinstance(arg, fx.Node) for i in _layout_ids(channels.layouts.get(arg.name))] \
                    + _layout_ids(lay):
                stream |= groups_of(ids)
            for m in by_node.get(node.name, ()):
                tag(m.ids, "heads", stream)
        weight, groups = _conv_weight_and_groups(node, gm, handler)
        if weight is not None and groups > 1 and (weight, 1) in channels.members:
            tag(channels.members[(weight, 1)].ids, "grouped_equal")  # per-group input positions
            tag(channels.members[(weight, 0)].ids, "grouped_equal")
        if isinstance(handler, ConvFunction) and WEIGHT_SOURCE in node.meta and isinstance(lay, Layout):
            tag(lay.ids, "computed_weight")
    return {g: frozenset(k) for g, k in sorted(kinds.items())}


def _conv_weight_and_groups(node, gm, handler) -> tuple[str | None, int]:
    """(weight parameter, groups) of a non-transposed conv node (module or functional), else (None, 1)."""
    if isinstance(handler, ConvModule):
        conv = gm.get_submodule(node.target)
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            return None, 1
        return f"{node.target}.weight", conv.groups
    if isinstance(handler, ConvFunction) and "transpose" not in getattr(node.target, "__name__", ""):
        groups = get_arg(node, ConvFunction._groups_index(node), "groups", 1)
        return get_attr_target(get_arg(node, 1, "weight")), groups if isinstance(groups, int) else 1
    return None, 1
