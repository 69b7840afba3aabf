"""The plan: what a method decided, and that decision resolved once against an analysis.

`PruningPlan` is the method's value (kept unit indices per group, residual branches and concat
inputs to remove, scale parameters to fold, constant scales the slim graph keeps). `resolve` turns
it, once per compress, into a `ResolvedPlan` that the rewrite, the masked reference, the cost model
and the recipe all share: the boolean keep-set over unit roots, the names of the nodes removed
structures take with them (read from the structures the analysis listed), and the kept positions
of every member tensor that loses something. The channel-count rules every method applies
(`min_channels`, `min_ratio`, `round_to`) live here too, so the graph passes that encode widths
and the selection agree.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch.fx as fx

from .structures import exclusive_branch

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis


@dataclass
class PruningPlan:
    """Kept unit indices per group; structures to remove whole."""

    keep: dict[int, np.ndarray] = field(default_factory=dict)
    remove_branches: list[tuple[str, int]] = field(default_factory=list)  # (add node, operand)
    drop_concat_inputs: list[tuple[str, int]] = field(default_factory=list)  # (cat node, input)
    fold_scales: list[str] = field(default_factory=list)  # gate/mask parameters folded into producers
    # constant multiplies the slim graph keeps: (node, operand, value) scales that node's input
    # `operand` (of a cat: its operand-th tensor) by value; GAL's block scales that fold nowhere
    scale_inputs: list[tuple[str, int, float]] = field(default_factory=list)


def _scaled_input(anchor: fx.Node, operand: int) -> fx.Node:
    args = anchor.args[0] if isinstance(anchor.args[0], (list, tuple)) else anchor.args
    return args[operand]


def input_scale_targets(graph: fx.Graph, edits) -> list[tuple[fx.Node, fx.Node, float]]:
    """(node, its input to scale, value) of each edit (PruningPlan.scale_inputs), resolved while the
    operand numbers still hold: the rewrite drops concat inputs first, which renumbers the rest."""
    nodes = {n.name: n for n in graph.nodes}
    return [(nodes[name], _scaled_input(nodes[name], operand), float(value)) for name, operand, value in edits]


def insert_scales(graph: fx.Graph, targets) -> None:
    """Put `x * value` between each target's node and its input `x` (`input_scale_targets`)."""
    for anchor, x, value in targets:
        with graph.inserting_before(anchor):
            y = graph.call_function(operator.mul, (x, value))
        anchor.replace_input_with(x, y)


def insert_input_scales(graph: fx.Graph, edits) -> None:
    """Put `x * value` between each edit's node and its input `x` (PruningPlan.scale_inputs)."""
    insert_scales(graph, input_scale_targets(graph, edits))


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan resolved against one analysis (module docstring)."""

    plan: PruningPlan
    keep_roots: np.ndarray  # boolean over unit roots
    removed_nodes: frozenset  # nodes removed branches and dropped concat inputs take with them
    kept_positions: dict  # {tensor: {dim: kept positions}} for every member tensor that loses something


def resolve(channels: ChannelAnalysis, plan) -> ResolvedPlan:
    """`plan` resolved against `analysis` (a ChannelAnalysis); a ResolvedPlan is returned as is."""
    if isinstance(plan, ResolvedPlan):
        return plan
    keep = plan_keep_roots(channels, plan)
    return ResolvedPlan(plan, keep, plan_removed_nodes(channels, plan), _kept_positions(channels, keep))


def plan_keep_roots(channels: ChannelAnalysis, plan: PruningPlan) -> np.ndarray:
    """Boolean over element roots, including the channels of dropped concat inputs."""
    keep = channels.keep_roots(plan.keep)
    for cat, index in plan.drop_concat_inputs:
        node = next(n for n in channels.gm.graph.nodes if n.name == cat)
        keep[channels.root[channels.layouts[node.args[0][index].name].ids]] = False
    return keep


def plan_removed_nodes(channels: ChannelAnalysis, plan: PruningPlan) -> frozenset:
    """Names of the nodes the plan's removed branches and dropped concat inputs take with them."""
    listed = {}
    if channels.structures is not None:  # the analysis already found each structure's nodes
        listed.update({(b.add, b.operand): b.nodes for b in channels.structures.residual_branches})
        listed.update({(c.cat, c.index): c.nodes for c in channels.structures.concat_inputs})
    nodes = order = None
    removed: set[str] = set()
    for key in [*plan.remove_branches, *plan.drop_concat_inputs]:
        key = tuple(key)
        if key not in listed:  # a structure the analysis did not list: walk the graph
            if nodes is None:
                nodes = {n.name: n for n in channels.gm.graph.nodes}
                order = {n: i for i, n in enumerate(channels.gm.graph.nodes)}
            anchor = nodes[key[0]]
            listed[key] = [n.name for n in exclusive_branch(_scaled_input(anchor, key[1]), anchor, order)]
        removed.update(listed[key])
    removed.update(add for add, _ in plan.remove_branches)  # the add itself goes (the shortcut takes its place)
    return frozenset(removed)


def _kept_positions(channels: ChannelAnalysis, keep_root: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """{tensor: {dim: kept positions}} for every member tensor that loses something."""
    per_tensor: dict[str, dict[int, np.ndarray]] = {}
    for (target, dim), member in channels.members.items():
        kept = keep_root[channels.root[member.ids]]
        if not kept.all():
            per_tensor.setdefault(target, {})[dim] = np.nonzero(kept)[0]
    return per_tensor


@dataclass
class GroupChoice:
    """How many units one group may keep: at least `minimum`, in steps of `step` (round_to)."""

    index: int
    units: np.ndarray  # unit roots
    order: np.ndarray  # unit indices, least important first
    minimum: int  # units kept at least
    step: int  # kept units rounded up to a multiple of this (round_to)


def group_choices(channels: ChannelAnalysis, scores, min_channels, min_ratio, round_to) -> list[GroupChoice]:
    """One GroupChoice per scored group: the channel rules of `Constraints`, in units."""
    out = []
    for gi, s in scores.items():
        g = channels.groups[gi]
        width = max(g.unit_channels, 1)
        minimum = max(1, math.ceil(max(min_channels, min_ratio * g.size) / width))
        step = 1 if not round_to else round_to // math.gcd(round_to, width)
        out.append(GroupChoice(gi, g.units, np.argsort(s, kind="stable"), min(minimum, g.n_units), step))
    return out


def kept_count(c: GroupChoice, kept: int) -> int:
    """`kept` units moved to the nearest count the rules allow (at least the minimum, rounded up)."""
    kept = max(kept, c.minimum)
    kept = math.ceil(kept / c.step) * c.step
    return min(kept, len(c.units))
