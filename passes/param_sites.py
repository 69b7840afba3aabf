"""Consumer-side scales: a unit's gate or mask on the parameter positions that read its channels.

The training methods (`gates.py`, `gal_masks.py`) scale a group's channels where they are produced:
after its BatchNorms, or after the convs/linears that write them. That is exact only when every
producer is such a layer. Attention heads are not (nn.MultiheadAttention computes a head inside
one leaf module: no node of the graph holds it; Swin/MaxViT/MViT heads likewise), nor is a
transformer's residual stream with ``layernorm="prune"`` (the attention's output projection, a
class token or positional embedding write it too). For those groups the scale goes on the other
side: on the group's role-"in" members, the parameter positions that read its channels (the
output-projection columns of a head, the q/k/v rows of a head position, the input columns of every
layer that reads the stream). Zeroing exactly those is what the masked reference does
(`passes/mask.py`), so a mask of 0 there is the masked reference, and a slim model from the same
keep-sets equals the masked network.

A site is one module call (the module is called through `ScaledCall`, which hands it its scaled
parameters via `torch.func.functional_call`; the module itself is shared, untouched) or one
get_attr of a parameter (a mul right after it). A site's gate multiplies each unit once along
every path, so the output is linear in it and its Taylor score is the unit's: when the site reads
the unit through input columns (dim 1) those alone take the gate and the other positions the mask
only; the positions the analysis lists as gate-free (`ChannelAnalysis.gate_free`: an attention's k
rows, since q·k would be quadratic in a gate on both q and k rows, and its v rows, which the
output-projection columns already gate, in another site for Swin's get_attr parameters) take the
mask only. `fold_param_scales` multiplies the learnt values into the parameters afterwards.

With ``layernorm="prune"`` the slim LayerNorm normalises over the kept channels only
(`ops/norm.py`); `masked_layer_norm` does the same with a live 0/1 mask, so a training graph whose
LayerNorms use it computes what the slim model will.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .context import Layout
from .tensors import get_tensor, is_parametrized

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis, ChannelGroup


@dataclass
class ParamSlice:
    """Positions of one parameter dim that read a group's channels, as one site scales them."""

    name: str  # the parameter, relative to the site's module (a get_attr site: its full target)
    dim: int
    positions: np.ndarray  # indices along `dim`
    units: np.ndarray  # unit (within the group) each position reads
    gated: np.ndarray  # bool per position: scaled by gate * mask (True) or by the mask only


@dataclass
class ParamSite:
    """Where a consumer-side scale applies: a called module (`module` its target) or a parameter
    read by get_attr (`module` None, each slice names the full target)."""

    key: str  # the module target, or the get_attr target
    module: str | None
    slices: list[ParamSlice]


def consumer_sites(channels: ChannelAnalysis, group: ChannelGroup) -> list[ParamSite] | None:
    """The sites scaling every role-"in" member of `group`, or None when one cannot be scaled (a
    parametrized tensor, or one read by neither a called module nor a get_attr)."""
    gm = channels.gm
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    found: dict[str, ParamSite] = {}
    members = [m for m in group.members if m.role == "in"]
    if not members:
        return None
    for m in members:
        owner_path, _, leaf = m.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if is_parametrized(owner, leaf):
            return None
        if m.target in attrs:
            site = found.setdefault(m.target, ParamSite(m.target, None, []))
            site.slices.append(ParamSlice(m.target, m.dim, m.positions, m.unit_of_position, np.ones(0, bool)))
            continue
        module = max((t for t in calls if m.target.startswith(t + ".")), key=len, default=None)
        if module is None:
            return None
        site = found.setdefault(module, ParamSite(module, module, []))
        site.slices.append(ParamSlice(m.target[len(module) + 1:], m.dim, m.positions, m.unit_of_position,
                                      np.ones(0, bool)))
    for site in found.values():
        columns = any(s.dim == 1 for s in site.slices) and len(site.slices) > 1
        for s in site.slices:
            gated = np.full(len(s.positions), s.dim == 1 if columns else True)
            target = s.name if site.module is None else f"{site.module}.{s.name}"
            free = channels.gate_free.get((target, s.dim))
            s.gated = gated if free is None else gated & ~free[s.positions]
    return list(found.values())


def _chain(channels: ChannelAnalysis, node: fx.Node) -> set[str]:
    """`node` and the nodes before it that carry the same channels through per-channel ops and feed
    nothing else (a BatchNorm site's chain reaches the conv, functional or not, whose output it
    normalises; not a conv whose output is also read past the BatchNorm — MaxViT's MBConv reads its
    input through `pre_norm` and through the `proj` shortcut — since a gate after the BatchNorm
    would miss that reader)."""
    ids = channels.layouts[node.name].ids
    names, x = {node.name}, node
    while True:
        inputs = x.all_input_nodes
        tensors = [i for i in inputs if i.op != "get_attr"]
        if len(tensors) != 1 or len(tensors[0].users) != 1:
            return names
        x = tensors[0]
        lay = channels.layouts.get(x.name)
        if not isinstance(lay, Layout) or not np.array_equal(lay.ids, ids):
            return names
        names.add(x.name)


_MULS = (operator.mul, torch.mul, "mul", "mul_")


def _scales_only(channels: ChannelAnalysis, node: fx.Node) -> bool:
    """Whether `node`'s output only multiplies its channels into others (a squeeze-excitation conv:
    through per-channel ops to a mul), so that a zero elsewhere stays zero without gating it."""
    ids = channels.layouts[node.name].ids
    x = node
    while len(x.users) == 1:
        x = next(iter(x.users))
        if x.target in _MULS:
            return True
        lay = channels.layouts.get(x.name)
        if not isinstance(lay, Layout) or not np.array_equal(lay.ids, ids):
            return False
    return False


def producers_covered(channels: ChannelAnalysis, group: ChannelGroup, sites: list[fx.Node]) -> bool:
    """Whether scaling the outputs of `sites` (BatchNorms or conv/linear calls) zeroes the group's
    channels wherever they are produced: every producer (role-"out" member) is a site, in a site's
    chain, or only scales gated channels (squeeze-excitation). Not so when a producer is no layer of
    its own (a head inside nn.MultiheadAttention, its output projection, a class token) or its own
    output mixes channels of several groups (ShuffleNetV2's blocks after a channel shuffle)."""
    nodes = {n.name: n for n in channels.gm.graph.nodes}
    reached = set().union(*(_chain(channels, node) for node in sites)) if sites else set()
    for m in group.members:
        if m.role != "out":
            continue
        member = channels.members.get((m.target, m.dim))
        node = nodes.get(member.node) if member is not None else None
        if node is None:
            return False
        if node.name not in reached and not (isinstance(channels.layouts.get(node.name), Layout)
                                             and _scales_only(channels, node)):
            return False
    return True


def scale_positions(p: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                    units: torch.Tensor, gated: torch.Tensor, dim: int) -> torch.Tensor:
    """`p` with the positions along `dim` multiplied by their unit's gate * mask (`gated`) or mask.
    `mask` None: 1 where the gate is nonzero, 0 where it is zero (GAL, whose soft mask is the gate:
    a zero entry removes its unit, so the gate-free positions of that unit go too — v2 Swin's cosine
    attention normalises over the k rows, which a q-only mask would leave standing)."""
    per_unit_mask = (gate != 0).to(gate.dtype).reshape(-1) if mask is None else mask.reshape(-1)
    scale = torch.where(gated, (gate.reshape(-1) * per_unit_mask)[units], per_unit_mask[units])
    factor = torch.ones(p.shape[dim], dtype=p.dtype, device=p.device).index_copy(0, positions, scale.to(p.dtype))
    shape = [1] * p.ndim
    shape[dim] = -1
    return p * factor.reshape(shape)


class ScaledCall(nn.Module):
    """Calls a shared module with some of its parameters scaled (`scale_positions`): called as
    ``ScaledCall(scales, *args, **kwargs)``, `scales` = (gate, mask) per entry, flattened. The module
    is registered here too (`inner`), so that a copy of the graph module (`fuse_masked_convs`) still
    holds, trains and moves its parameters; `parameters()` counts a tensor once."""

    def __init__(self, module: nn.Module, entries: list[tuple[int, ParamSlice]]):
        super().__init__()
        self.inner = module
        self.names, self.dims, self.pairs = [], [], []
        like = next(iter(module.parameters()), torch.zeros(()))
        for j, (pair, s) in enumerate(entries):
            self.names.append(s.name)
            self.dims.append(s.dim)
            self.pairs.append(pair)
            for what, value in (("positions", s.positions), ("units", s.units)):
                self.register_buffer(f"{what}_{j}", torch.as_tensor(value, dtype=torch.long, device=like.device),
                                     persistent=False)
            self.register_buffer(f"gated_{j}", torch.as_tensor(s.gated, dtype=torch.bool, device=like.device),
                                 persistent=False)

    def forward(self, scales, *args, **kwargs):
        module = self.inner
        overrides: dict[str, torch.Tensor] = {}
        for j, (name, dim, pair) in enumerate(zip(self.names, self.dims, self.pairs)):
            p = overrides[name] if name in overrides else get_tensor(module, name)
            where = (getattr(self, f"positions_{j}"), getattr(self, f"units_{j}"), getattr(self, f"gated_{j}"))
            overrides[name] = scale_positions(p, scales[2 * pair], scales[2 * pair + 1], *where, dim)
        return torch.func.functional_call(module, overrides, args, kwargs)


def insert_param_scales(gm: fx.GraphModule, sites: list[tuple[ParamSite, str, str | None]], prefix: str) -> None:
    """Edit `gm`'s graph so each site's parameters are scaled by its (gate, mask) attributes (named by
    `gm` targets; a mask None: the gate's nonzero entries, `scale_positions`): a called module goes
    through a `ScaledCall`, a get_attr gets a mul after it.
    Several sites on one module or parameter (one per group it reads) chain on one call."""
    by_module: dict[str, list] = {}
    by_attr: dict[str, list] = {}
    for site, gate, mask in sites:
        (by_attr if site.module is None else by_module).setdefault(site.key, []).append((site, gate, mask))
    for k, (module, entries) in enumerate(by_module.items()):
        pairs = [(gate, mask) for _, gate, mask in entries]
        slices = [(i, s) for i, (site, _, _) in enumerate(entries) for s in site.slices]
        name = f"{prefix}call_{k}"
        gm.add_submodule(name, ScaledCall(gm.get_submodule(module), slices))
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module]:
            with gm.graph.inserting_before(node):
                scales = tuple(None if t is None else gm.graph.get_attr(t) for pair in pairs for t in pair)
            node.target = name
            node.args = (scales, *node.args)
    for k, (target, entries) in enumerate(by_attr.items()):
        like = get_tensor(gm, target)
        chain = []
        for j, (site, gate, mask) in enumerate(entries):
            for i, s in enumerate(site.slices):
                tensors = []
                for what, value, dtype in (("positions", s.positions, torch.long), ("units", s.units, torch.long),
                                           ("gated", s.gated, torch.bool)):
                    tensors.append(f"{prefix}attr_{k}_{j}_{i}_{what}")
                    gm.register_buffer(tensors[-1], torch.as_tensor(value, dtype=dtype, device=like.device),
                                       persistent=False)
                chain.append((gate, mask, tensors, s.dim))
        for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]:
            users, last = list(node.users), node
            for gate, mask, tensors, dim in chain:
                refs, at = [], last
                for t in (gate, mask, *tensors):  # each right after the one before (inserting_after
                    if t is None:  # one node would put them in reverse order)
                        refs.append(None)  # no mask: the gate's nonzero entries (`scale_positions`)
                        continue
                    with gm.graph.inserting_after(at):
                        at = gm.graph.get_attr(t)
                    refs.append(at)
                with gm.graph.inserting_after(at):
                    last = gm.graph.call_function(scale_positions, (last, *refs, dim))
            for u in users:
                u.replace_input_with(node, last)


def fold_param_scales(gm: nn.Module, site: ParamSite, gate: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Multiply a site's learnt scales into the parameters of `gm` (in place, like `fold.fold_into`)."""
    with torch.no_grad():
        for s in site.slices:
            target = s.name if site.module is None else f"{site.module}.{s.name}"
            p = get_tensor(gm, target)
            args = [torch.as_tensor(v, device=p.device) for v in (s.positions, s.units, s.gated)]
            p.copy_(scale_positions(p, gate.to(p.device), None if mask is None else mask.to(p.device), *args, s.dim))


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """LayerNorm over the last dim whose statistics cover the positions where `keep` is 1, zeros
    elsewhere: `ops/norm.MaskedLayerNorm` (the masked reference) with a live 0/1 mask. All kept:
    exactly F.layer_norm."""
    width = x.shape[-1]
    if bool(keep.all()):
        return F.layer_norm(x, (width,), weight, bias, eps)
    keep = keep.to(x.dtype)
    n = keep.sum().clamp_min(1)
    mean = (x * keep).sum(-1, keepdim=True) / n
    centred = (x - mean) * keep
    y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / n + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * keep


def _unit_index(channels, group, ids: np.ndarray) -> np.ndarray | None:
    """The unit (position in `group.units`) of each element id, or None if one is not in the group."""
    roots = channels.root[ids]
    lookup = {int(u): i for i, u in enumerate(group.units)}
    units = [lookup.get(int(r)) for r in roots]
    return None if any(u is None for u in units) else np.asarray(units, dtype=np.int64)


def layer_norms_of(channels: ChannelAnalysis, groups: set[int]) -> list[tuple[fx.Node, int, np.ndarray]]:
    """The LayerNorms over the channel dim alone (last dim) whose channels are in `groups` (pruned
    through them: ``layernorm="prune"``), each with its group and the unit of each channel."""
    group_of_root = {int(u): g.index for g in channels.prunable_groups for u in g.units}
    out = []
    for node in channels.gm.graph.nodes:
        shape = None
        if node.op == "call_module" and isinstance(channels.gm.get_submodule(node.target), nn.LayerNorm):
            shape = channels.gm.get_submodule(node.target).normalized_shape
        elif node.op == "call_function" and node.target is F.layer_norm:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        lay = channels.layouts.get(node.name)
        if shape is None or len(shape) != 1 or not isinstance(lay, Layout):
            continue
        value = node.meta.get("fxprune_value")
        if value is None or lay.dim != len(value.shape) - 1:
            continue
        gi = group_of_root.get(int(channels.root[lay.ids[0]]))
        units = None if gi is None or gi not in groups else _unit_index(channels, channels.groups[gi], lay.ids)
        if units is not None:
            out.append((node, gi, units))
    return out


def mask_layer_norms(gm: fx.GraphModule, norms: list[tuple[fx.Node, int, np.ndarray]], unit_masks: dict[int, str],
                     prefix: str, nonzero: bool = False) -> None:
    """Replace each LayerNorm of `norms` (nodes of the graph `gm` was copied from) in `gm`'s graph by
    `masked_layer_norm` reading its group's per-unit 0/1 mask (`unit_masks`: group -> attribute); with
    `nonzero`, the attribute holds soft mask values and a unit is kept where its value is not zero."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for k, (orig, gi, units) in enumerate(norms):
        node = nodes[orig.name]
        index = f"{prefix}ln_{k}_units"
        like = next(iter(gm.parameters()), torch.zeros(()))
        gm.register_buffer(index, torch.as_tensor(units, dtype=torch.long, device=like.device), persistent=False)
        if node.op == "call_module":
            ln = gm.get_submodule(node.target)
            x, eps = node.args[0], ln.eps
            weight = f"{node.target}.weight" if ln.weight is not None else None
            bias = f"{node.target}.bias" if ln.bias is not None else None
        else:
            x = node.args[0]
            get = lambda i, name, default=None: node.args[i] if len(node.args) > i else node.kwargs.get(name, default)  # noqa: E731
            weight, bias, eps = get(2, "weight"), get(3, "bias"), get(4, "eps", 1e-5)
        with gm.graph.inserting_before(node):
            mask, idx = gm.graph.get_attr(unit_masks[gi]), gm.graph.get_attr(index)
            if nonzero:
                mask = gm.graph.call_function(torch.ne, (mask, 0))
            keep = gm.graph.call_function(torch.index_select, (mask, 0, idx))
            w = gm.graph.get_attr(weight) if isinstance(weight, str) else weight
            b = gm.graph.get_attr(bias) if isinstance(bias, str) else bias
            new = gm.graph.call_function(masked_layer_norm, (x, keep, w, b, eps))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
