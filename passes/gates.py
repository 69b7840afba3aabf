"""Gate insertion: a per-channel gate after every BatchNorm of a prunable group.

`insert_gates(analysis)` returns a copy of the graph (sharing the modules, so training it trains
them) in which each gate site ``y = site(x)`` becomes ``y = site(x) * (gate * mask)``: `gate` a
parameter initialised to 1, `mask` a 0/1 buffer. Sites are the BatchNorms of prunable groups; a
group without a BatchNorm is gated after the conv/linear layers that produce it. Each site knows
which unit of its group each of its channels belongs to, so scores from several sites of a coupled
group (residual adds) add up per unit.

A group some of whose producers are no such layer (attention heads, computed inside
nn.MultiheadAttention or Swin's attention; a transformer's residual stream with
``layernorm="prune"``, also written by the attention's output projection) is gated on the consumer
side instead (`param_sites`): one gate per unit on the parameter positions that read it, so that
mask 0 is exactly the masked reference. A group that can be gated neither way has no site
(`GatedModel.ungated`): a method must keep it whole, it has no score. With ``layernorm="prune"``
the gated graph's LayerNorms over gated channels normalise over the unmasked ones only
(`param_sites.masked_layer_norm`, reading `GatedModel.unit_masks`), as the slim model's will.

Example::

    >>> gated = insert_gates(analysis)
    >>> gated.module(x)   # same function as before: all gates are 1
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
from .fold import fold_into
from .param_sites import _unit_index
from .param_sites import (
    ParamSite,
    consumer_sites,
    fold_param_scales,
    insert_param_scales,
    layer_norms_of,
    mask_layer_norms,
    producers_covered,
)

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis

_BN = nn.modules.batchnorm._BatchNorm
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class GateSite:
    node: str  # the gated node
    gate: str  # parameter name on the gated module
    mask: str  # buffer name
    group: int
    unit_of_channel: np.ndarray  # unit index (in the group) of each gated channel
    params: ParamSite | None = None  # a consumer-side site: the parameter positions it scales (per unit)


@dataclass
class GatedModel:
    module: fx.GraphModule
    sites: list[GateSite]
    ungated: list[int] = field(default_factory=list)  # prunable groups no gate could be placed on
    unit_masks: dict[int, str] = field(default_factory=dict)  # group -> per-unit 0/1 mask its LayerNorms read

    def gates(self) -> list[nn.Parameter]:
        return [getattr(self.module, s.gate) for s in self.sites]


def _sites(channels: ChannelAnalysis) -> list[tuple[fx.Node, int, np.ndarray, int]]:
    group_of_root = {int(u): g.index for g in channels.prunable_groups for u in g.units}
    found: dict[int, list] = {}
    producers: dict[int, list] = {}
    for node in channels.gm.graph.nodes:
        lay = channels.layouts.get(node.name)
        if node.op != "call_module" or not isinstance(lay, Layout):
            continue
        gi = group_of_root.get(int(channels.root[lay.ids[0]]))
        if gi is None:
            continue
        units = _unit_index(channels, channels.groups[gi], lay.ids)
        if units is None:
            continue
        mod = channels.gm.get_submodule(node.target)
        target = found if isinstance(mod, _BN) else producers if isinstance(mod, _PRODUCERS) else None
        if target is not None:
            target.setdefault(gi, []).append((node, gi, units, lay.dim))
    sites = []
    for gi in sorted(set(found) | set(producers)):
        sites.extend(found.get(gi) or producers[gi])
    return sites


def _placement(channels: ChannelAnalysis) -> tuple[list, dict[int, list[ParamSite]], list[int]]:
    """(output sites, consumer-side sites per group, ungated groups): output sites where they cover
    every producer of their group; else consumer-side sites where every reader can take one; else
    the partial output sites, as before; else none (module docstring)."""
    output = _sites(channels)
    by_group: dict[int, list] = {}
    for site in output:
        by_group.setdefault(site[1], []).append(site)
    kept, consumer, ungated = [], {}, []
    for group in channels.prunable_groups:
        own = by_group.get(group.index, [])
        if own and producers_covered(channels, group, [node for node, *_ in own]):
            kept.extend(own)
            continue
        params = consumer_sites(channels, group)
        if params:
            consumer[group.index] = params
        elif own:
            kept.extend(own)
        else:
            ungated.append(group.index)
    return kept, consumer, ungated


def insert_gates(channels: ChannelAnalysis) -> GatedModel:
    """Gated copy of `analysis.gm` (see module docstring)."""
    gm = fx.GraphModule(channels.gm, copy.deepcopy(channels.gm.graph), channels.gm.__class__.__name__)
    nodes = {n.name: n for n in gm.graph.nodes}
    params = next(iter(channels.gm.parameters()), torch.zeros(()))
    output, consumer, ungated = _placement(channels)
    sites = []
    for k, (orig, gi, units, dim) in enumerate(output):
        node = nodes[orig.name]
        ndim = len(orig.meta["fxprune_value"].shape)
        shape = [1] * ndim
        shape[dim] = len(units)
        gate, mask = f"fxprune_gate_{k}", f"fxprune_mask_{k}"
        gm.register_parameter(gate, nn.Parameter(torch.ones(shape, dtype=params.dtype, device=params.device)))
        gm.register_buffer(mask, torch.ones(shape, dtype=params.dtype, device=params.device))
        users = list(node.users)
        with gm.graph.inserting_after(node):
            g = gm.graph.get_attr(gate)
        with gm.graph.inserting_after(g):
            m = gm.graph.get_attr(mask)
        with gm.graph.inserting_after(m):
            gm_ = gm.graph.call_function(torch.mul, (g, m))
        with gm.graph.inserting_after(gm_):
            y = gm.graph.call_function(torch.mul, (node, gm_))
        for u in users:
            u.replace_input_with(node, y)
        sites.append(GateSite(orig.name, gate, mask, gi, units))
    scaled = []
    for gi, group_sites in consumer.items():
        n = channels.groups[gi].n_units
        for site in group_sites:
            k = len(sites)
            gate, mask = f"fxprune_gate_{k}", f"fxprune_mask_{k}"
            gm.register_parameter(gate, nn.Parameter(torch.ones(n, dtype=params.dtype, device=params.device)))
            gm.register_buffer(mask, torch.ones(n, dtype=params.dtype, device=params.device))
            sites.append(GateSite(site.key, gate, mask, gi, np.arange(n), site))
            scaled.append((site, gate, mask))
    insert_param_scales(gm, scaled, "fxprune_gated_")
    unit_masks = _mask_layer_norms(channels, gm, {s.group for s in sites}, params)
    gm.graph.lint()
    gm.recompile()
    gm.training = channels.gm.training
    return GatedModel(gm, sites, ungated, unit_masks)


def _mask_layer_norms(channels: ChannelAnalysis, gm: fx.GraphModule, groups: set[int], like) -> dict[int, str]:
    """LayerNorms pruned through (``layernorm="prune"``) read a per-unit mask of their group."""
    norms = layer_norms_of(channels, groups)
    unit_masks = {}
    for gi in sorted({gi for _, gi, _ in norms}):
        unit_masks[gi] = f"fxprune_unit_mask_{gi}"
        gm.register_buffer(unit_masks[gi], torch.ones(channels.groups[gi].n_units, dtype=like.dtype,
                                                       device=like.device))
    mask_layer_norms(gm, norms, unit_masks, "fxprune_gated_")
    return unit_masks


def fold_gates(channels: ChannelAnalysis, gated: GatedModel) -> None:
    """Multiply each site's gate*mask into its module (BN affine, or conv/linear rows; a consumer-side
    site: the parameter positions it scales), in place.

    The modules are shared with `analysis.gm`, so afterwards `analysis.gm` computes what the gated
    model computed; pruning the masked units then removes exactly the channels that were off.
    """
    with torch.no_grad():
        for s in gated.sites:
            if s.params is not None:
                fold_param_scales(channels.gm, s.params, getattr(gated.module, s.gate), getattr(gated.module, s.mask))
                continue
            scale = (getattr(gated.module, s.gate) * getattr(gated.module, s.mask)).reshape(-1)
            node = next(n for n in channels.gm.graph.nodes if n.name == s.node)
            mod = channels.gm.get_submodule(node.target)
            if not fold_into(mod, scale.detach()):
                raise ValueError(f"cannot fold a gate into {s.node}: {type(mod).__name__} without affine parameters")
