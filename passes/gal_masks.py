"""Soft-mask insertion for GAL: one learnable scalar per channel unit, concat input and residual block.

`insert_soft_masks(analysis, structures)` returns a copy of the graph (sharing the modules, so
training it trains them) with mask operators inserted as graph nodes; the model's code is not
touched. Three kinds of mask, any subset:

* ``channel``: one scalar per unit of each prunable channel group, *shared* by every producer of
  the group (a residual stage's coupled group has one mask vector for all its blocks). Each
  producer conv/linear is a *site*: the mask multiplies the output of its BatchNorm (when the conv
  feeds exactly one affine BN) or of the layer itself, gathered per channel
  (``y * mask[unit_of_channel]``). Covering every producer is what makes a zero mask a channel that
  is zero everywhere, so pruning it keeps the masked network's function exactly. For masks >= 0
  this equals the authors' placement after the ReLU (ReLU is positively homogeneous). A group
  some of whose producers no such site reaches (attention heads inside nn.MultiheadAttention or
  Swin's attention, a transformer's stream with ``layernorm="prune"``, channels mixed by a shuffle)
  is masked on the reading side instead (`param_sites`: the mask scales the parameter positions
  that read each unit, which at zero is the masked reference); its LayerNorms pruned through then
  normalise over the units whose mask is not zero, as the slim model's will.
* ``branch``: one scalar per droppable input of a channel concat (`passes.structures`), on the
  input, before the ``cat``.
* ``block``: one scalar per residual add, on its residual branch (the operand with the most MACs;
  a downsampling block's projection shortcut is the other operand), before the add.

Masks start at `init` (``ones``: the masked network equals the original; ``normal``/``uniform``:
the authors' N(0,1) / U(0,1) draws).

Example::

    >>> masked = insert_soft_masks(analysis, ("channel", "block"))
    >>> torch.equal(masked.module(x), analysis.gm(x))   # all masks are 1
    True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .context import Layout
from .param_sites import _unit_index
from .param_sites import (
    ParamSite,
    consumer_sites,
    insert_param_scales,
    layer_norms_of,
    mask_layer_norms,
    producers_covered,
)

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis

STRUCTURES = ("channel", "branch", "block")
INITS = ("ones", "normal", "uniform")
_BN = nn.modules.batchnorm._BatchNorm
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class ChannelSite:
    node: str  # the masked node (a BN or the producing layer)
    index: str  # buffer: unit index of each channel of the node's output
    dim: int


@dataclass
class ChannelMask:
    group: int
    param: str
    sites: list[ChannelSite] = field(default_factory=list)
    params: list[ParamSite] = field(default_factory=list)  # reading-side sites (module docstring); their
    # gate-free positions take 1 where the mask is nonzero, 0 where it is zero (`scale_positions`)


@dataclass
class ScalarMask:
    """A block (`anchor` = add node, `operand`) or a branch (`anchor` = cat node, `operand` = input)."""

    kind: str  # "block" or "branch"
    anchor: str
    operand: int
    param: str
    nodes: list[str]  # what removing it deletes
    macs: int


@dataclass
class SoftMaskedModel:
    module: fx.GraphModule
    channel: list[ChannelMask]
    scalar: list[ScalarMask]
    skipped: dict[str, str] = field(default_factory=dict)  # group/structure -> why it has no mask

    def params(self) -> list[nn.Parameter]:
        return [getattr(self.module, m.param) for m in [*self.channel, *self.scalar]]

    def value(self, param: str) -> torch.Tensor:
        return getattr(self.module, param).detach()

    @property
    def blocks(self) -> list[ScalarMask]:
        return [m for m in self.scalar if m.kind == "block"]

    @property
    def branches(self) -> list[ScalarMask]:
        return [m for m in self.scalar if m.kind == "branch"]


def _initial(shape, init: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if init == "ones":
        t = torch.ones(shape, dtype=torch.float64)
    elif init == "normal":
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
    return t.to(dtype=like.dtype, device=like.device)


def _site_of(gm: fx.GraphModule, producer: fx.Node) -> fx.Node:
    users = list(producer.users)
    if len(users) == 1 and users[0].op == "call_module":
        mod = gm.get_submodule(users[0].target)
        if isinstance(mod, _BN) and mod.affine:
            return users[0]
    return producer


def channel_sites(channels: ChannelAnalysis) -> tuple[dict[int, list[tuple[fx.Node, np.ndarray, int]]], dict[str, str]]:
    """Per prunable group: (site node, unit index per channel, channel dim) for every producer."""
    group_of_root = {int(u): g.index for g in channels.prunable_groups for u in g.units}
    calls: dict[str, int] = {}
    for node in channels.gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sites: dict[int, list] = {}
    skipped: dict[str, str] = {}
    for node in channels.gm.graph.nodes:
        lay = channels.layouts.get(node.name)
        if node.op != "call_module" or not isinstance(lay, Layout):
            continue
        if not isinstance(channels.gm.get_submodule(node.target), _PRODUCERS):
            continue
        gi = group_of_root.get(int(channels.root[lay.ids[0]]))
        if gi is None:
            continue
        site = _site_of(channels.gm, node)
        units = _unit_index(channels, channels.groups[gi], channels.layouts[site.name].ids)
        if units is None or calls[site.target] > 1 or calls[node.target] > 1:
            skipped[f"group {gi}"] = f"{node.name}: shared module or channels outside the group"
            continue
        sites.setdefault(gi, []).append((site, units, channels.layouts[site.name].dim))
    for gi in [g for g in sites if f"group {g}" in skipped]:
        del sites[gi]  # a partly masked group would not be zero everywhere at mask 0
    return sites, skipped


def _placement(channels: ChannelAnalysis) -> tuple[dict, dict[int, list[ParamSite]], dict[str, str]]:
    """(output sites per group, reading-side sites per group, skipped): output sites where they reach
    every producer of the group, else reading-side sites where every reader can take one, else
    none (the group stays whole, its reason in `skipped`)."""
    sites, skipped = channel_sites(channels)
    consumer: dict[int, list[ParamSite]] = {}
    for group in channels.prunable_groups:
        own = sites.get(group.index)
        if own and producers_covered(channels, group, [site for site, _, _ in own]):
            continue
        params = consumer_sites(channels, group)
        sites.pop(group.index, None)
        if params:
            consumer[group.index] = params
            skipped.pop(f"group {group.index}", None)
        else:
            skipped.setdefault(f"group {group.index}", "no mask reaches every producer or every reader of its "
                                                       "channels")
    return sites, consumer, skipped


def _scalar_candidates(channels: ChannelAnalysis, structures) -> list[tuple[str, str, int, list[str], int]]:
    found = channels.structures
    out = []
    if "block" in structures:
        out += [("block", b.add, b.operand, b.nodes, b.macs) for b in found.residual_bodies()]
    if "branch" in structures:
        out += [("branch", c.cat, c.index, c.nodes, c.macs) for c in found.concat_inputs]
    return out


def _mul_after(graph: fx.Graph, node: fx.Node, scale: fx.Node, users) -> fx.Node:
    with graph.inserting_after(scale):
        y = graph.call_function(torch.mul, (node, scale))
    for u in users:
        u.replace_input_with(node, y)
    return y


def insert_soft_masks(channels: ChannelAnalysis, structures=STRUCTURES, init: str = "ones", seed: int = 0) -> SoftMaskedModel:
    """Masked copy of `analysis.gm` (see module docstring)."""
    gm = fx.GraphModule(channels.gm, copy.deepcopy(channels.gm.graph), channels.gm.__class__.__name__)
    nodes = {n.name: n for n in gm.graph.nodes}
    like = next(iter(channels.gm.parameters()), torch.zeros(()))
    gen = torch.Generator().manual_seed(seed)
    graph = gm.graph
    channel, scalar, skipped = [], [], {}
    if "channel" in structures:
        sites, consumer, skipped = _placement(channels)
        scaled = []  # reading-side sites, inserted together: one module may read several groups
        for k, gi in enumerate(sorted({*sites, *consumer})):
            param = f"fxprune_gal_channel_{k}"
            gm.register_parameter(param, nn.Parameter(_initial(channels.groups[gi].n_units, init, like, gen)))
            mask = ChannelMask(gi, param)
            if gi in consumer:
                mask.params = consumer[gi]
                scaled.extend((site, param, None) for site in mask.params)  # gate-free: live units (nonzero)
            for j, (site, units, dim) in enumerate(sites.get(gi, ())):
                node = nodes[site.name]
                index = f"{param}_index_{j}"
                gm.register_buffer(index, torch.as_tensor(units, dtype=torch.long, device=like.device))
                shape = [1] * len(site.meta["fxprune_value"].shape)
                shape[dim] = len(units)
                users = list(node.users)
                with graph.inserting_after(node):
                    p = graph.get_attr(param)
                with graph.inserting_after(p):
                    i = graph.get_attr(index)
                with graph.inserting_after(i):
                    g = graph.call_function(torch.index_select, (p, 0, i))
                with graph.inserting_after(g):
                    s = graph.call_function(torch.reshape, (g, tuple(shape)))
                _mul_after(graph, node, s, users)
                mask.sites.append(ChannelSite(site.name, index, dim))
            channel.append(mask)
        insert_param_scales(gm, scaled, "fxprune_gal_")
        norms = layer_norms_of(channels, {m.group for m in channel})
        mask_layer_norms(gm, norms, {m.group: m.param for m in channel}, "fxprune_gal_", nonzero=True)
    for k, (kind, anchor, operand, branch, macs) in enumerate(_scalar_candidates(channels, structures)):
        param = f"fxprune_gal_{kind}_{k}"
        gm.register_parameter(param, nn.Parameter(_initial((), init, like, gen)))
        a = nodes[anchor]
        x = a.args[operand] if kind == "block" else a.args[0][operand]
        with graph.inserting_before(a):
            p = graph.get_attr(param)
        with graph.inserting_after(p):
            y = graph.call_function(torch.mul, (x, p))
        if kind == "block":
            args = list(a.args)
            args[operand] = y
            a.args = tuple(args)
        else:
            inputs = list(a.args[0])
            inputs[operand] = y
            a.args = (inputs, *a.args[1:])
        scalar.append(ScalarMask(kind, anchor, operand, param, list(branch), int(macs)))
    graph.lint()
    gm.recompile()
    gm.training = channels.gm.training
    return SoftMaskedModel(gm, channel, scalar, skipped)
