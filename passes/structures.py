"""Coarse structures later methods remove whole: residual branches and concat inputs.

A residual branch is an operand `F(x)` of a coupling add `y = s + F(x)` whose nodes serve that
operand only; removing it leaves `y = s` (the block becomes its shortcut). A concat input is an
input of a channel `cat` whose producing nodes serve only that cat; dropping it removes its
channels from the concatenation and its whole branch.

Example::

    >>> # after analyze_dependencies(gm):
    >>> structures = find_structures(analysis)
    >>> [b.add for b in structures.residual_branches][:2]
    ['add', 'add_1']
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .context import Layout
from .ops.registry import get_arg

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


@dataclass
class ResidualBranch:
    add: str  # the add node
    operand: int  # which operand is the branch
    nodes: list[str]  # the branch's nodes, topologically ordered (removed with it)
    macs: int


@dataclass
class ConcatInput:
    cat: str
    index: int
    channels: int
    nodes: list[str]
    macs: int


@dataclass
class Structures:
    residual_branches: list[ResidualBranch] = field(default_factory=list)
    concat_inputs: list[ConcatInput] = field(default_factory=list)

    def residual_bodies(self) -> list[ResidualBranch]:
        """Per residual add, its branch with the most MACs: the block's body (the other operand,
        if it is a branch at all, is a projection shortcut). What GAL's block masks and the latency
        selection's block removal (`blocks=True`) act on."""
        body: dict[str, ResidualBranch] = {}
        for b in self.residual_branches:
            if b.add not in body or b.macs > body[b.add].macs:
                body[b.add] = b
        return list(body.values())


def exclusive_branch(start: fx.Node, consumer: fx.Node, order: dict | None = None) -> list[fx.Node]:
    """Nodes computing `start` that serve nothing but `consumer` (through them), in graph order.

    Walks `start`'s ancestors latest-first, so every user of a node is decided before the node:
    a node joins when all its users are in the branch. Whatever also feeds another input of the
    consumer, or anything else, has a user outside and stays.
    """
    if start.op in ("placeholder", "get_attr") or any(u is not consumer for u in start.users):
        return []
    if order is None:
        order = {n: i for i, n in enumerate(start.graph.nodes)}
    branch = {start}
    heap = [(-order[n], id(n), n) for n in start.all_input_nodes]
    heapq.heapify(heap)
    seen = set()
    while heap:
        _, _, n = heapq.heappop(heap)
        if n in seen or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        if all(u in branch for u in n.users):
            branch.add(n)
            for m in n.all_input_nodes:
                heapq.heappush(heap, (-order[m], id(m), m))
    return sorted(branch, key=order.__getitem__)


def _macs(nodes) -> int:
    return int(sum(n.meta.get("fxprune_macs", 0) for n in nodes))


def find_structures(channels: ChannelAnalysis) -> Structures:
    found = Structures()
    order = {n: i for i, n in enumerate(channels.gm.graph.nodes)}
    for node in channels.gm.graph.nodes:
        lay = channels.layouts.get(node.name)
        if node.target in _ADDS and isinstance(lay, Layout):
            _residual(node, channels, found, order)
        if node.target in (torch.cat, torch.concat) and isinstance(lay, Layout):
            _concat(node, lay, channels, found, order)
    channels.structures = found
    return found


def _residual(node, channels: ChannelAnalysis, found, order):
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or node.kwargs:
        return
    out_shape = node.meta["fxprune_value"].shape
    for i, op in enumerate(operands):
        other = operands[1 - i]
        if getattr(other.meta.get("fxprune_value"), "shape", None) != out_shape:
            continue  # removing the branch would change the result's shape
        nodes = exclusive_branch(op, node, order)
        if any(n.op in ("call_module", "call_function", "call_method") for n in nodes):
            found.residual_branches.append(ResidualBranch(node.name, i, [n.name for n in nodes], _macs(nodes)))


def _concat(node, lay, channels: ChannelAnalysis, found, order):
    inputs = list(get_arg(node, 0, "tensors"))
    if get_arg(node, 1, "dim", 0) % len(node.meta["fxprune_value"].shape) != lay.dim:
        return
    for i, x in enumerate(inputs):
        x_lay = channels.layouts.get(x.name)
        if not isinstance(x_lay, Layout) or inputs.count(x) > 1:
            continue
        nodes = exclusive_branch(x, node, order)
        if nodes:
            found.concat_inputs.append(ConcatInput(node.name, i, len(x_lay.ids), [n.name for n in nodes], _macs(nodes)))
