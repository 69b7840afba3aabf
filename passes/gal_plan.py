"""From learnt soft masks to a pruning plan: what is removed, what it costs, and folding the rest.

A structure is removed when its mask is exactly zero (FISTA's soft threshold produces exact
zeros): channel units through the core rewrite's keep-sets, residual blocks through
`PruningPlan.remove_branches` (the block becomes its shortcut), concat inputs through
`PruningPlan.drop_concat_inputs` (the input's whole producing branch goes, the consumer is
sliced). A structure nested inside a removed one is not listed twice; a group whose every mask
is zero keeps one unit, and a concat whose every input mask is zero keeps one input (their
folded scale is zero, so the function is unchanged).

`fold_masks` then multiplies the surviving mask values into the modules in place (the BN's
affine or the layer's rows for channel sites, the reading positions for reading-side ones
(`param_sites`); for a block/branch scalar, the last BN/conv/linear of the branch, walking back
through positively homogeneous ops such as ReLU and pooling; failing that, the scale is returned
as a `PruningPlan.scale_inputs` edit: a constant multiply the rewrite puts into the slim graph and
the recipe records, so save/load replays it). Afterwards the private model computes what the
masked network computed, so the core verification (slim vs masked reference) proves the slim
model equals the GAL generator.

Example::

    >>> state = mask_state(analysis.channels, masked)
    >>> cost.macs(state.keep_roots, state.removed_nodes) / cost.total_macs
    0.31
    >>> fold_masks(analysis.channels, masked); plan = state.plan
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .fold import fold_into
from .gal_masks import SoftMaskedModel
from .param_sites import fold_param_scales
from .plan import PruningPlan, plan_keep_roots
from .tensors import get_tensor

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis

# y = f(x) with f(m * x) == m * f(x) for m >= 0: a scalar can move through them to the layer before
_HOMOGENEOUS_FUNCS = {F.relu, torch.relu, F.leaky_relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
                      F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                      F.adaptive_avg_pool3d, F.adaptive_max_pool2d, torch.flatten, F.dropout}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
                        nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)
try:  # torchvision's random drops (leaves since the tracer reads their mode at run time): x times a factor >= 0
    from torchvision.ops import DropBlock2d, DropBlock3d, StochasticDepth

    _HOMOGENEOUS_MODULES += (StochasticDepth, DropBlock2d, DropBlock3d)
except ImportError:  # torchvision is optional
    pass


@dataclass
class MaskState:
    plan: PruningPlan
    keep_roots: np.ndarray
    removed_nodes: frozenset
    removed_blocks: list[str] = field(default_factory=list)  # add nodes
    removed_branches: list[str] = field(default_factory=list)  # "cat[index]"
    widths: dict[int, tuple[int, int]] = field(default_factory=dict)  # group -> (kept, total) units


def _nonzero(t: torch.Tensor) -> np.ndarray:
    return (t.detach().reshape(-1) != 0).cpu().numpy()


def mask_state(channels: ChannelAnalysis, masked: SoftMaskedModel, zeroed: float | None = None) -> MaskState:
    """The structure the masks encode; `zeroed`: also treat masks <= this value as zero."""
    def alive(t):
        a = _nonzero(t)
        if zeroed is not None:
            a &= (t.detach().reshape(-1).abs() > zeroed).cpu().numpy()
        return a

    keep, widths = {}, {}
    for m in masked.channel:
        a = alive(masked.value(m.param))
        if not a.any():
            a[int(masked.value(m.param).abs().argmax())] = True
        keep[m.group] = np.nonzero(a)[0]
        widths[m.group] = (int(a.sum()), len(a))
    dead = [s for s in masked.scalar if not alive(masked.value(s.param))[0]]
    nested = set().union(*(set(s.nodes) for s in dead)) if dead else set()
    dead = [s for s in dead if s.anchor not in nested]
    by_cat: dict[str, list] = {}
    for s in dead:
        if s.kind == "branch":
            by_cat.setdefault(s.anchor, []).append(s)
    cat_nodes = {n.name: n for n in channels.gm.graph.nodes if n.name in by_cat}
    for cat, drops in by_cat.items():
        if len(drops) == len(cat_nodes[cat].args[0]):
            dead.remove(min(drops, key=lambda s: s.operand))  # a concat keeps one input
    plan = PruningPlan(keep=keep,
                       remove_branches=[(s.anchor, s.operand) for s in dead if s.kind == "block"],
                       drop_concat_inputs=[(s.anchor, s.operand) for s in dead if s.kind == "branch"])
    removed = frozenset(n for s in dead for n in s.nodes)
    return MaskState(plan, plan_keep_roots(channels, plan), removed,
                     [s.anchor for s in dead if s.kind == "block"],
                     [f"{s.anchor}[{s.operand}]" for s in dead if s.kind == "branch"], widths)


def state_macs(cost, state: MaskState) -> float:
    return cost.macs(state.keep_roots, state.removed_nodes)


def mask_costs(channels: ChannelAnalysis, cost, masked: SoftMaskedModel) -> list[torch.Tensor]:
    """MACs each mask entry saves when it alone goes to zero (from the full model), one tensor per
    mask parameter: a channel unit its group's per-unit share, a block/branch its branch's MACs."""
    total = cost.total_macs
    out = []
    for m in masked.channel:
        group = channels.groups[m.group]
        saved = total - cost.macs(channels.keep_roots({m.group: range(1, group.n_units)}))
        out.append(torch.full((group.n_units,), float(saved)))
    for s in masked.scalar:
        out.append(torch.tensor(float(s.macs)))
    return out


def _single_call(gm: fx.GraphModule, target: str) -> bool:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target) == 1


def _homogeneous(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCS
    if node.op == "call_method":
        return node.target in _HOMOGENEOUS_METHODS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _HOMOGENEOUS_MODULES)


def _fold_scalar(gm: fx.GraphModule, anchor: fx.Node, x: fx.Node, value: float) -> bool:
    """Fold `value` into the layer producing `x` (walking back through homogeneous ops)."""
    node = x
    while value >= 0 and len(node.users) == 1 and _homogeneous(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op != "call_module" or len(node.users) != 1 or not _single_call(gm, node.target):
        return False
    mod = gm.get_submodule(node.target)
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor):  # nothing to scale: the rewrite keeps the scale as an edit
        return False
    with torch.no_grad():
        return fold_into(mod, torch.tensor([value], dtype=weight.dtype, device=weight.device))


def fold_masks(channels: ChannelAnalysis, masked: SoftMaskedModel, state: MaskState) -> list[tuple[str, int, float]]:
    """Multiply the surviving masks into `analysis.gm`'s modules (in place: pass a private copy);
    returns the scales nothing foldable precedes, as `PruningPlan.scale_inputs` edits (node,
    operand, value) for the rewrite to replay. The graph itself is not edited."""
    gm = channels.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    with torch.no_grad():
        for m in masked.channel:
            values = masked.value(m.param)
            for site in m.params:
                fold_param_scales(gm, site, values, None)
            for site in m.sites:
                scale = values[get_tensor(masked.module, site.index)]
                mod = gm.get_submodule(nodes[site.node].target)
                if not fold_into(mod, scale.to(mod.weight.dtype)):
                    raise ValueError(f"GAL channel mask at {site.node}: {type(mod).__name__} cannot take a scale")
    dead = {(a, o) for a, o in [*state.plan.remove_branches, *state.plan.drop_concat_inputs]}
    unfolded = []
    for s in masked.scalar:
        if (s.anchor, s.operand) in dead or s.anchor in state.removed_nodes:
            continue
        value = float(masked.value(s.param))
        anchor = nodes[s.anchor]
        x = anchor.args[s.operand] if s.kind == "block" else anchor.args[0][s.operand]
        if value != 1.0 and not _fold_scalar(gm, anchor, x, value):
            unfolded.append((s.anchor, s.operand, value))
    return unfolded
