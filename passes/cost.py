"""Cost model: MACs and parameters of the model before and after any keep-set.

MACs per node come from shape propagation (`FlopCounterMode`'s count / 2: convolutions,
linear layers, matmuls, attention). A pruned conv/linear's MACs scale with the kept fraction of
every sliced dim of its weight — exact, because those MACs are a product of the weight's dims
and the (unchanged) spatial size. So any candidate keep-set is *recounted*, never extrapolated,
in microseconds. FLOPs are reported separately as 2 x MACs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch.fx as fx

from .shapes import MACS

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis


@dataclass
class _Scaled:
    base: float
    slots: list  # root arrays: kept fraction of each multiplies `base`


def _weight_target(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if "fxprune_weight_source" in node.meta:  # a conv whose weight is computed from this parameter
        return node.meta["fxprune_weight_source"]
    if node.op == "call_module":
        return f"{node.target}.weight"
    if node.op == "call_function" and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return w.target
    return None


class CostModel:
    """Counts of one analysed model; `macs(keep)`/`params(keep)` for a boolean over unit roots."""

    def __init__(self, channels: ChannelAnalysis):
        self.channels = channels
        root = channels.root
        by_target: dict[str, list] = {}
        for (target, _dim), m in channels.members.items():
            by_target.setdefault(target, []).append(root[m.ids])
        self.node_macs: dict[str, _Scaled] = {}
        for node in channels.gm.graph.nodes:
            macs = node.meta.get(MACS, 0)
            if not macs:
                continue
            target = _weight_target(node, channels.gm)
            if node.op == "call_module" and target not in by_target and f"{node.target}.in_proj_weight" in by_target:
                target = f"{node.target}.in_proj_weight"  # attention: MACs scale with the kept heads
            self.node_macs[node.name] = _Scaled(float(macs), by_target.get(target, []))
        self.param_sizes: list[_Scaled] = []
        self.param_owner: list[str] = []
        for name, p in channels.gm.named_parameters():
            self.param_sizes.append(_Scaled(float(p.numel()), by_target.get(name, [])))
            self.param_owner.append(name)
        self.total_macs = sum(s.base for s in self.node_macs.values())
        self.total_params = sum(s.base for s in self.param_sizes)

    @staticmethod
    def _value(s: _Scaled, keep: np.ndarray | None) -> float:
        if keep is None:
            return s.base
        v = s.base
        for roots in s.slots:
            v *= keep[roots].mean()
        return v

    def macs(self, keep: np.ndarray | None = None, removed_nodes: frozenset = frozenset()) -> float:
        return sum(self._value(s, keep) for name, s in self.node_macs.items() if name not in removed_nodes)

    def params(self, keep: np.ndarray | None = None, removed_params: frozenset = frozenset()) -> float:
        return sum(self._value(s, keep) for name, s in zip(self.param_owner, self.param_sizes)
                   if name not in removed_params)

