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

# A node whose MACs are a sum of parts that scale with different channels (nn.MultiheadAttention
# pruned per head width: the q/k part with the kept q/k positions, the v part with the kept v
# positions) lists them as [(share of its MACs, [element ids whose kept fraction multiplies it])].
MACS_TERMS = "fxprune_macs_terms"

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis


@dataclass
class _Scaled:
    base: float
    slots: list  # root arrays: kept fraction of each multiplies `base`


def _weight_target(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if "fxprune_weight_source" in node.meta:  # a conv whose weight is computed from this parameter, an attention leaf
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
        terms_of: dict[str, list[str]] = {}  # node -> its node_macs keys, where it has several terms
        for node in channels.gm.graph.nodes:
            macs = node.meta.get(MACS, 0)
            if not macs:
                continue
            if node.meta.get(MACS_TERMS):
                keys = terms_of[node.name] = []
                for i, (share, ids) in enumerate(node.meta[MACS_TERMS]):
                    keys.append(node.name if i == 0 else f"{node.name}#{i}")
                    self.node_macs[keys[-1]] = _Scaled(float(macs) * share, [root[np.asarray(a)] for a in ids])
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
        self._macs_sum = _ScaledSum(list(self.node_macs.values()))
        self._params_sum = _ScaledSum(self.param_sizes)
        self._macs_index = {name: [i] for i, name in enumerate(self.node_macs)}
        for name, keys in terms_of.items():
            self._macs_index[name] = [i for key in keys for i in self._macs_index[key]]
        self._params_index = {name: i for i, name in enumerate(self.param_owner)}

    @staticmethod
    def _value(s: _Scaled, keep: np.ndarray | None) -> float:
        if keep is None:
            return s.base
        v = s.base
        for roots in s.slots:
            v *= keep[roots].mean()
        return v

    def macs(self, keep: np.ndarray | None = None, removed_nodes: frozenset = frozenset()) -> float:
        return self._macs_sum.total(keep, [i for n in removed_nodes for i in self._macs_index.get(n, ())])

    def params(self, keep: np.ndarray | None = None, removed_params: frozenset = frozenset()) -> float:
        return self._params_sum.total(keep, [self._params_index[n] for n in removed_params
                                             if n in self._params_index])

    def macs_touching(self, roots) -> "_ScaledSum":
        """The MACs of only the node terms that scale with any of the unit `roots`, as a sum whose
        `total(keep)` recounts them: what one group's move changes, without recounting the model
        (`total(keep_after) - total(keep_before)` is the move's change of `macs`)."""
        wanted = set(np.asarray(roots, dtype=np.int64).ravel().tolist())
        return _ScaledSum([s for s in self.node_macs.values()
                           if any(wanted.intersection(np.asarray(r).ravel().tolist()) for r in s.slots)])


class _ScaledSum:
    """The sum of many `_Scaled` values for one keep array, vectorised: the selections recount
    thousands of candidate keep-sets (a latency selection on densenet121: ~14k), and a Python
    loop over every node and slot made that minutes. Same arithmetic as `CostModel._value`
    (base x the kept fraction of each slot, in slot order), up to float rounding."""

    def __init__(self, items: list[_Scaled]):
        self.base = np.asarray([s.base for s in items], dtype=np.float64)
        slots = [np.asarray(r, dtype=np.int64).ravel() for s in items for r in s.slots]
        self.owner = np.asarray([i for i, s in enumerate(items) for _ in s.slots], dtype=np.int64)
        self.length = np.asarray([len(r) for r in slots], dtype=np.float64)
        self.flat = np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)
        self.segment = np.repeat(np.arange(len(slots)), [len(r) for r in slots])

    def total(self, keep: np.ndarray | None, removed: list[int]) -> float:
        values = self.base.copy()
        if keep is not None and len(self.owner):
            kept = np.bincount(self.segment, weights=np.asarray(keep, dtype=np.float64)[self.flat],
                               minlength=len(self.length))
            with np.errstate(invalid="ignore", divide="ignore"):
                fraction = kept / self.length  # an empty slot gives NaN, as the mean of nothing does
            np.multiply.at(values, self.owner, fraction)
        if removed:
            values[removed] = 0.0
        return float(values.sum())

