"""Gate insertion: a per-channel gate after every BatchNorm of a prunable group.

`insert_gates(analysis)` returns a copy of the graph (sharing the modules, so training it trains
them) in which each gate site ``y = site(x)`` becomes ``y = site(x) * (gate * mask)``: `gate` a
parameter initialised to 1, `mask` a 0/1 buffer. Sites are the BatchNorms of prunable groups; a
group without a BatchNorm is gated after the conv/linear layers that produce it. Each site knows
which unit of its group each of its channels belongs to, so scores from several sites of a coupled
group (residual adds) add up per unit.

Example::

    >>> gated = insert_gates(analysis)
    >>> gated.module(x)   # same function as before: all gates are 1
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .context import Layout
from .fold import fold_into

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


@dataclass
class GatedModel:
    module: fx.GraphModule
    sites: list[GateSite]

    def gates(self) -> list[nn.Parameter]:
        return [getattr(self.module, s.gate) for s in self.sites]


def _unit_index(channels: ChannelAnalysis, group, ids: np.ndarray) -> np.ndarray | None:
    roots = channels.root[ids]
    lookup = {int(u): i for i, u in enumerate(group.units)}
    units = [lookup.get(int(r)) for r in roots]
    return None if any(u is None for u in units) else np.asarray(units, dtype=np.int64)


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


def insert_gates(channels: ChannelAnalysis) -> GatedModel:
    """Gated copy of `analysis.gm` (see module docstring)."""
    gm = fx.GraphModule(channels.gm, copy.deepcopy(channels.gm.graph), channels.gm.__class__.__name__)
    nodes = {n.name: n for n in gm.graph.nodes}
    params = next(iter(channels.gm.parameters()), torch.zeros(()))
    sites = []
    for k, (orig, gi, units, dim) in enumerate(_sites(channels)):
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
    gm.graph.lint()
    gm.recompile()
    gm.training = channels.gm.training
    return GatedModel(gm, sites)


def fold_gates(channels: ChannelAnalysis, gated: GatedModel) -> None:
    """Multiply each site's gate*mask into its module (BN affine, or conv/linear rows), in place.

    The modules are shared with `analysis.gm`, so afterwards `analysis.gm` computes what the gated
    model computed; pruning the masked units then removes exactly the channels that were off.
    """
    with torch.no_grad():
        for s in gated.sites:
            scale = (getattr(gated.module, s.gate) * getattr(gated.module, s.mask)).reshape(-1)
            node = next(n for n in channels.gm.graph.nodes if n.name == s.node)
            mod = channels.gm.get_submodule(node.target)
            if not fold_into(mod, scale.detach()):
                raise ValueError(f"cannot fold a gate into {s.node}: {type(mod).__name__} without affine parameters")
