"""The layers of an analysed graph whose time depends on kept channels, and a bench that builds
any one of them, alone, at any kept counts.

A *layer* is a call node whose input or output channels belong to a prunable group; its *axes*
say how its channel counts follow the groups' kept units: on the output axis (the groups of its
output layout) and on the input axis (the groups its tensor inputs carry that its output does
not: a conv's or a linear's input channels). A norm, an activation, an add or a pooling has only
the output axis (its input channels are its output channels); a conv between two groups has
both; the first conv (the image's channels are fixed) and the classifier (its classes are fixed)
have one. An axis coordinate is the count of kept channel positions along it:
``fixed + sum_g p_g x kept_g`` (p_g: positions per unit of group g, e.g. H x W per channel after a
flatten; fixed: positions no varying group owns). Views (`view`, `flatten`, `getitem`, ...) cost
nothing and are left out; so are a node whose inputs are not all tensors and one that cannot run
alone (`LatencyModel.profile["skipped"]` lists them, with why). What they cost goes into the fit,
like the time of every layer no prunable group touches (the offset takes what does not change
with the kept units, the scale roughly the rest).

Layers are measured once per *signature*: the op (module type and settings, function, method),
its tensor arguments' shapes and dtypes at the profiled batch, its literal arguments, its
parameters' shapes and its axes (groups' sizes, positions per unit, fixed positions). Identical
blocks of a network (resnet50's layer3.1 ... layer3.5) share one measurement.

`LayerBench` builds a layer on the device: a one-node GraphModule (the node, its parameters, a
placeholder per tensor input) rewritten by the core rewrite (`passes.rewrite.apply_plan`, the same
slicing and handler fix-ups a real pruning gets) at the requested kept units, converted to the
profiled device / dtype / memory format, fed views of one shared random buffer shaped like the
node's inputs at those counts. The analysis and the user's model are never modified: the rewrite
works on a private copy.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.passes.context import Layout
from fxprune.passes.plan import PruningPlan, ResolvedPlan
from fxprune.passes.rewrite import apply_plan
from fxprune.passes.shapes import VALUE, TensorSpec, propagate
from fxprune.passes.tensors import get_tensor

from ..passes.inputs import ExampleInputs

FREE_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "size", "dim", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "expand", "expand_as", "contiguous", "__getitem__", "chunk", "split", "unbind",
    "narrow", "detach", "to", "type_as", "float", "half", "bfloat16", "numel"})
FREE_FUNCTIONS = frozenset({
    operator.getitem, getattr, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.split, torch.chunk, torch.narrow, torch.unbind, torch.t})
FREE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout)


def layout_ids(layout: Any) -> np.ndarray:
    """Element ids of a layout (a Layout, or a tuple/list of them), concatenated."""
    if isinstance(layout, Layout):
        return np.asarray(layout.ids, dtype=np.int64)
    if isinstance(layout, (tuple, list)):
        parts = [layout_ids(item) for item in layout]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Axis:
    """How one channel count of a layer follows kept units (module docstring).

    `groups`: ((group index, n_units, positions per unit), ...), the main group (most positions)
    first; `fixed`: positions no group of the axis owns; `unit_channels`: channels per unit of the
    main group (the grid's 8-channel rule reads it)."""

    fixed: float
    groups: tuple
    unit_channels: int

    @property
    def varying(self) -> float:
        return float(sum(n * p for _, n, p in self.groups))

    @property
    def full(self) -> float:
        return self.fixed + self.varying

    @property
    def main_units(self) -> int:
        return int(self.groups[0][1])

    def coord(self, kept: Mapping[int, int]) -> float:
        """Kept positions along the axis for kept units per group (groups absent: full)."""
        return self.fixed + float(sum(p * kept.get(g, n) for g, n, p in self.groups))

    def kept_at(self, k_main: int) -> dict[int, int]:
        """The axis' groups with the main group at `k_main` units, the others in proportion."""
        n_main = self.main_units
        return {g: int(k_main) if i == 0 else max(1, min(n, round(k_main / n_main * n)))
                for i, (g, n, _) in enumerate(self.groups)}

    def units(self, coord: float, group: int) -> int:
        """Kept units of `group` at axis coordinate `coord` (the inverse of `coord` along the grid)."""
        n = next(n for g, n, _ in self.groups if g == group)
        level = (coord - self.fixed) / self.varying if self.varying > 0 else 1.0
        return int(min(max(round(level * n), 1), n))

    def shape_key(self) -> tuple:
        return (round(self.fixed, 6), tuple((n, round(p, 6)) for _, n, p in self.groups), self.unit_channels)

    def to_json(self) -> dict:
        return {"fixed": self.fixed, "groups": [[int(g), int(n), float(p)] for g, n, p in self.groups],
                "unit_channels": int(self.unit_channels)}

    @classmethod
    def from_json(cls, data: dict) -> "Axis":
        groups = tuple((int(g), int(n), float(p)) for g, n, p in data["groups"])
        return cls(float(data["fixed"]), groups, int(data["unit_channels"]))


@dataclass(frozen=True)
class LayerSpec:
    node: str
    op: str
    in_axis: Axis | None
    out_axis: Axis | None
    signature: str = ""

    @property
    def groups(self) -> list[int]:
        return sorted({g for axis in (self.in_axis, self.out_axis) if axis for g, _, _ in axis.groups})


def _group_of_root(channels) -> np.ndarray:
    out = np.full(len(channels.root), -1, dtype=np.int64)
    for g in channels.prunable_groups:
        out[g.units] = g.index
    return out


def _axis(channels, group_of, ids: np.ndarray, groups: set) -> Axis:
    owners = group_of[channels.root[ids]]
    rows = []
    for g in groups:
        count = int(np.count_nonzero(owners == g))
        n = channels.groups[g].n_units
        rows.append((g, n, count / n))
    rows.sort(key=lambda r: (-r[1] * r[2], r[0]))
    fixed = float(len(ids) - sum(n * p for _, n, p in rows))
    return Axis(fixed, tuple(rows), int(channels.groups[rows[0][0]].unit_channels))


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _free(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), FREE_MODULES)
    if node.op == "call_function":
        return node.target in FREE_FUNCTIONS
    return node.target in FREE_METHODS


def node_axes(channels, node: fx.Node, group_of: np.ndarray | None = None) -> tuple[Axis | None, Axis | None]:
    """(input axis, output axis) of a call node (module docstring); None where no group varies it."""
    group_of = _group_of_root(channels) if group_of is None else group_of
    out_ids = layout_ids(channels.layouts.get(node.name))
    in_ids = [layout_ids(channels.layouts.get(a.name)) for a in node.all_input_nodes if a.op != "get_attr"]
    in_ids = np.concatenate(in_ids) if in_ids else np.zeros(0, dtype=np.int64)
    g_out = {int(g) for g in np.unique(group_of[channels.root[out_ids]])} - {-1}
    g_in = {int(g) for g in np.unique(group_of[channels.root[in_ids]])} - {-1} - g_out
    return (_axis(channels, group_of, in_ids, g_in) if g_in else None,
            _axis(channels, group_of, out_ids, g_out) if g_out else None)


def _describe(gm: fx.GraphModule, node: fx.Node, specs: Mapping[str, Any]) -> str:
    if node.op == "get_attr":
        try:
            t = get_tensor(gm, node.target)
        except AttributeError:
            t = None
        return f"attr{tuple(t.shape)}{t.dtype}" if isinstance(t, torch.Tensor) else "attr"
    return repr(specs.get(node.name))


def signature(gm: fx.GraphModule, node: fx.Node, specs: Mapping[str, Any], in_axis, out_axis) -> str:
    """A digest of everything a layer's time depends on (module docstring), node names excluded."""
    parts: list = [node.op]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        parts += [f"{type(mod).__module__}.{type(mod).__qualname__}", mod.extra_repr(),
                  [(n, tuple(t.shape), str(t.dtype)) for n, t in [*mod.named_parameters(), *mod.named_buffers()]]]
    elif node.op == "call_function":
        parts.append(f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', node.target)}")
    else:
        parts.append(str(node.target))
    parts.append(repr(fx.node.map_arg((node.args, node.kwargs), lambda n: f"<{_describe(gm, n, specs)}>")))
    parts.append(repr(specs.get(node.name)))
    parts.append((in_axis.shape_key() if in_axis else None, out_axis.shape_key() if out_axis else None))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def find_layers(channels, specs: Mapping[str, Any]) -> tuple[list[LayerSpec], list[dict]]:
    """The layers to profile, in graph order, and the varying nodes left out (with why)."""
    gm, group_of = channels.gm, _group_of_root(channels)
    layers, skipped = [], []
    for node in gm.graph.nodes:
        if not node.op.startswith("call"):
            continue
        in_axis, out_axis = node_axes(channels, node, group_of)
        if in_axis is None and out_axis is None:
            continue
        tensor_args = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if _free(gm, node):
            skipped.append({"node": node.name, "reason": "a view (free)"})
        elif not all(isinstance(specs.get(a.name), TensorSpec) for a in tensor_args) or not tensor_args:
            skipped.append({"node": node.name, "reason": "an input is not a tensor"})
        elif not isinstance(specs.get(node.name), TensorSpec):
            skipped.append({"node": node.name, "reason": "its output is not one tensor"})
        else:
            layers.append(LayerSpec(node.name, op_name(gm, node), in_axis, out_axis,
                                    signature(gm, node, specs, in_axis, out_axis)))
    return layers, skipped


def specs_at(channels, analysis_inputs: ExampleInputs, inputs: ExampleInputs) -> dict[str, Any]:
    """Every node's output spec for `inputs` (the analysis' own when the shapes are the same; else
    propagated on a copy of the graph, the analysis' graph untouched)."""
    same = [tuple(t.shape) for t in analysis_inputs.tensors()] == [tuple(t.shape) for t in inputs.tensors()]
    if same:
        return {n.name: n.meta.get(VALUE) for n in channels.gm.graph.nodes}
    twin = fx.GraphModule(channels.gm, copy.deepcopy(channels.gm.graph))
    propagate(twin, inputs)
    return {n.name: n.meta.get(VALUE) for n in twin.graph.nodes}


def grid_units(axis: Axis, points: int, tiles: bool) -> tuple[list[int], int]:
    """(ascending main-group unit counts to measure, the quantum in units).

    With `tiles` (GPU): every count whose channels are a multiple of 8, and the full count. Else
    (CPU): `points` counts evenly spread from one quantum to the full count, on multiples of 8
    channels where the group is large enough for `points` of them (oneDNN's sweet spots, and the
    counts `round_to=8` selects), else on every unit."""
    n = axis.main_units
    q = 8 // math.gcd(8, max(axis.unit_channels, 1))
    if tiles:
        ks = set(range(q, n + 1, q))
    else:
        if n // q < points:
            q = 1
        raw = np.round(np.linspace(q, n, max(points, 2)) / q) * q
        ks = {int(k) for k in np.clip(raw, 1, n)}
    ks.add(n)
    return sorted(ks), q


class InputBuffer:
    """One flat random tensor per (device, dtype), grown on demand; inputs are views of it (filling
    fresh random activations for every measured point would cost more than measuring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flat: dict[torch.dtype, torch.Tensor] = {}

    def view(self, shape, dtype: torch.dtype, offset: int, channels_last: bool) -> torch.Tensor:
        numel = int(math.prod(shape))
        if not (dtype.is_floating_point or dtype.is_complex):
            return torch.zeros(shape, dtype=dtype, device=self.device)
        flat = self.flat.get(dtype)
        if flat is None or flat.numel() < offset + numel:
            size = max(offset + numel, 2 * (flat.numel() if flat is not None else 0))
            g = torch.Generator().manual_seed(0)
            flat = torch.randn(size, generator=g).to(device=self.device, dtype=dtype)
            self.flat[dtype] = flat
        part = flat[offset:offset + numel]
        if channels_last and len(shape) == 4:
            n, c, h, w = shape
            return part.view(n, h, w, c).permute(0, 3, 1, 2)
        return part.view(shape)


_IN_PLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                       operator.itruediv: operator.truediv}


def _out_of_place(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` (a private one-layer copy) with in-place ops made out-of-place: timed over and over on
    views of the shared input buffer, an in-place op (`SiLU(inplace=True)`, `relu_`, `x += y`)
    would overwrite that buffer on every call, its values decaying to subnormals (slow on x86) and
    to zeros. The out-of-place op reads and writes as much memory."""
    changed = False
    for mod in gm.modules():
        if getattr(mod, "inplace", None) is True:
            mod.inplace, changed = False, True
    for node in gm.graph.nodes:
        if node.kwargs.get("inplace") is True:
            node.kwargs, changed = {**node.kwargs, "inplace": False}, True
        if node.op == "call_method" and node.target.endswith("_") and hasattr(torch.Tensor, node.target[:-1]):
            node.target, changed = node.target[:-1], True
        if node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS:
            node.target, changed = _IN_PLACE_FUNCTIONS[node.target], True
    if changed:
        gm.recompile()
    return gm


class LayerBench:
    """Builds one layer alone at any kept units (module docstring)."""

    def __init__(self, channels, layer: LayerSpec, specs: Mapping[str, Any], *, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, buffer: InputBuffer):
        self.channels, self.layer = channels, layer
        self.device, self.dtype, self.channels_last, self.buffer = device, dtype, channels_last, buffer
        node = next(n for n in channels.gm.graph.nodes if n.name == layer.node)
        graph, env, self.args, owned = fx.Graph(), {}, [], set()
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                env[arg] = graph.get_attr(arg.target)
                owned.add(arg.target)
            else:
                env[arg] = graph.placeholder(arg.name)
                self.args.append((specs[arg.name], channels.layouts.get(arg.name)))
            env[arg].meta = dict(arg.meta)
        graph.output(graph.node_copy(node, lambda a: env[a]))
        mini = fx.GraphModule(channels.gm, graph)
        self.mini = dataclasses.replace(channels, gm=mini)
        prefix = f"{node.target}." if node.op == "call_module" else None
        self.members = [(t, d, m.ids) for (t, d), m in channels.members.items()
                        if t in owned or (prefix and t.startswith(prefix))]
        self.out_layout = channels.layouts.get(node.name)
        mod = channels.gm.get_submodule(node.target) if node.op == "call_module" else None
        self.fixed_in = getattr(mod, "in_channels", getattr(mod, "in_features", None))

    def keep_root(self, kept: Mapping[int, int]) -> np.ndarray:
        keep = np.ones(len(self.channels.root), dtype=bool)
        for g, k in kept.items():
            keep[self.channels.groups[g].units[int(k):]] = False
        return keep

    def _count(self, keep: np.ndarray, layout) -> int | None:
        ids = layout_ids(layout)
        return int(np.count_nonzero(keep[self.channels.root[ids]])) if len(ids) else None

    def channels_at(self, kept: Mapping[int, int]) -> tuple[int | None, int | None]:
        """(channels of the first tensor input, channels of the output) at `kept`. An input whose
        channels are not tracked (a model input) counts the module's `in_channels` / `in_features`
        (None for other ops)."""
        keep = self.keep_root(kept)
        first = self._count(keep, self.args[0][1]) if self.args else None
        return first if first is not None else self.fixed_in, self._count(keep, self.out_layout)

    def build(self, kept: Mapping[int, int]) -> Callable[[], object]:
        """A function running the layer once at `kept` units (its groups; the others full)."""
        keep = self.keep_root(kept)
        per_tensor: dict[str, dict[int, np.ndarray]] = {}
        for target, dim, ids in self.members:
            k = keep[self.channels.root[ids]]
            if not k.all():
                per_tensor.setdefault(target, {})[dim] = np.nonzero(k)[0]
        with torch.no_grad():
            slim = _out_of_place(apply_plan(self.mini, ResolvedPlan(PruningPlan(), keep, frozenset(), per_tensor)))
            slim.eval()
            slim.to(device=self.device, dtype=self.dtype)
            if self.channels_last:
                slim.to(memory_format=torch.channels_last)
        args, offset = [], 0
        for spec, layout in self.args:
            shape = list(spec.shape)
            if isinstance(layout, Layout):
                shape[layout.dim] = int(np.count_nonzero(keep[self.channels.root[layout.ids]]))
            dtype = self.dtype if spec.dtype.is_floating_point else spec.dtype
            args.append(self.buffer.view(tuple(shape), dtype, offset, self.channels_last))
            offset += int(math.prod(shape))
        return lambda: slim(*args)


__all__ = ["Axis", "InputBuffer", "LayerBench", "LayerSpec", "find_layers", "grid_units", "layout_ids",
           "node_axes", "op_name", "signature", "specs_at"]
