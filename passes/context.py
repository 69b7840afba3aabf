"""The state the dependency analysis builds while it walks the graph.

Every channel slot the analysis sees gets an integer *element id*. A tensor's channel layout is
`Layout(dim, ids)`: along `dim`, index j carries element `ids[j]` (ids repeat after a flatten,
where one channel becomes H*W features). Handlers *couple* elements that must be pruned together
(a residual add couples its operands elementwise), *mark* elements that must stay (a boundary),
and record *members*: parameter/buffer slices `(target, dim)` whose index j belongs to `ids[j]`.
The connected components of the coupling graph (union-find) are the prunable units.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from .shapes import VALUE, TensorSpec

LAYOUT = "fxprune_layout"

# Roles of a member slot: "out" rows a layer produces, "in" columns a layer reads (these are the
# ones masked to zero to build the masked reference), "channel" per-channel vectors (norm affine,
# running stats, biases) that follow their channel.


@dataclass(frozen=True)
class Layout:
    """Which dim of a tensor carries channels, and the element id at each index of that dim."""

    dim: int
    ids: np.ndarray


@dataclass
class Member:
    target: str  # qualified name of the parameter/buffer in the GraphModule
    dim: int
    ids: np.ndarray
    role: str
    node: str  # the node that registered it first


@dataclass
class Boundary:
    node: str
    reason: str


@dataclass
class AnalysisContext:
    """Element allocation, couplings, marks and members (see module docstring)."""

    gm: fx.GraphModule
    n_elements: int = 0
    edges: list = field(default_factory=list)  # (a_ids, b_ids) pairs to couple elementwise
    marks: list = field(default_factory=list)  # (ids, reason)
    members: dict = field(default_factory=dict)  # (target, dim) -> Member
    boundaries: list = field(default_factory=list)
    tainted: set = field(default_factory=set)  # parameters read by a boundary op: never sliced
    modules: dict = field(default_factory=dict)  # memo of get_submodule: handlers ask twice per node
    weight_sources: dict = field(default_factory=dict)  # parameter -> conv computing its weight from it (ops/conv.py)
    # (target, dim) -> bool per position: positions a unit's consumer-side gate leaves alone (mask
    # only), so the output stays linear in the gate (an attention's k and v rows; passes/param_sites.py)
    gate_free: dict = field(default_factory=dict)
    grouped: str = "whole"  # grouped convs: "whole" groups, "equal" positions per group, or "auto" (ops/conv.py)
    heads: str = "whole"  # nn.MultiheadAttention: "whole" heads, per-head "width", or "auto" (ops/attention.py)
    layernorm: str = "boundary"  # LayerNorm over the channel dim: a "boundary", or "prune" it (ops/norm.py)

    def get_submodule(self, target: str) -> nn.Module:
        mod = self.modules.get(target)
        if mod is None:
            mod = self.modules[target] = self.gm.get_submodule(target)
        return mod

    # -- elements ---------------------------------------------------------------------------
    def new_ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.n_elements, self.n_elements + n, dtype=np.int64)
        self.n_elements += n
        return ids

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        """Elements a[j] and b[j] are pruned together."""
        assert a.shape == b.shape, (a.shape, b.shape)
        differ = a != b
        if differ.any():
            self.edges.append((a[differ], b[differ]))

    def mark(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.marks.append((ids, reason))

    def opaque_ids(self, n: int, reason: str) -> np.ndarray:
        ids = self.new_ids(n)
        self.mark(ids, reason)
        return ids

    # -- members ----------------------------------------------------------------------------
    def member(self, target: str, dim: int, ids: np.ndarray | None, role: str, node: fx.Node,
               size: int | None = None) -> np.ndarray:
        """Register `target`'s `dim` as a member; returns its canonical ids.

        With `ids=None` fresh ids are allocated (a producer's output rows). A slot registered a
        second time (a module called twice) is coupled with what it had.
        """
        key = (target, dim)
        old = self.members.get(key)
        if old is not None:
            if ids is not None:
                self.couple(old.ids, ids)
            return old.ids
        if ids is None:
            ids = self.new_ids(size)
        self.members[key] = Member(target, dim, ids, role, node.name)
        return ids

    # -- reading the graph ------------------------------------------------------------------
    @staticmethod
    def spec(arg: Any) -> Any:
        return arg.meta.get(VALUE) if isinstance(arg, fx.Node) else arg

    def is_tensor(self, arg: Any) -> bool:
        return isinstance(self.spec(arg), TensorSpec)

    @staticmethod
    def layout(arg: Any) -> Any:
        return arg.meta.get(LAYOUT) if isinstance(arg, fx.Node) else None

    def ids_on(self, arg: fx.Node, dim: int, node: fx.Node) -> np.ndarray:
        """Element ids along `dim` of tensor `arg`, as `node` reads them.

        A tensor with no tracked layout, or whose channels live on another dim, yields fresh
        marked ids (and in the second case its own channels are marked too).
        """
        spec = self.spec(arg)
        size = spec.shape[dim]
        lay = self.layout(arg)
        if isinstance(lay, Layout) and lay.dim == dim:
            return lay.ids
        if isinstance(lay, Layout):
            self.mark(lay.ids, f"{node.name} reads dim {dim} but channels of {arg.name} are on dim {lay.dim}")
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            return self.opaque_ids(size, f"model input '{arg.name}'")
        return self.opaque_ids(size, f"{node.name} reads an input whose channels are not tracked")

    def boundary(self, node: fx.Node, reason: str) -> None:
        """`node` is opaque: every channel it reads stays, and its output has no tracked layout."""
        self.boundaries.append(Boundary(node.name, reason))
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                self.tainted.add(arg.target)
            self.mark_all(self.layout(arg), f"boundary {node.name}: {reason}")

    def mark_all(self, lay: Any, reason: str) -> None:
        if isinstance(lay, Layout):
            self.mark(lay.ids, reason)
        elif isinstance(lay, (tuple, list)):
            for item in lay:
                self.mark_all(item, reason)
