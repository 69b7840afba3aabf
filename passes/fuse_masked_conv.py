"""Fuse mask multiplications into their convs: ``torch.ops.fxprune.masked_conv2d`` (`fxprune.kernels`).

`fuse_masked_convs(gm, mode=...)` returns a copy of `gm` (sharing its modules, parameters and
buffers, so training it trains them and in-place mask updates are seen) in which masked convs
cost what their live channels cost. A *channel scale* below is an expression built only from
`get_attr` tensors (parameters, buffers) with `mul`/`reshape`/`view`/`index_select`... that
broadcasts per channel against the conv output: shape [1, C, 1, 1], [C, 1, 1] or a scalar, or a
product of such (``gate * mask``, GAL's ``reshape(index_select(mask, 0, index), [1, C, 1, 1])``).
A *constant factor* of a scale is a factor of its product built from buffers and from parameters
that do not require grad (GAL's frozen masks) only: its zeros are structural, nothing trains them.
Which parameters require grad is read when the pass runs: re-run it after changing that.

Fused patterns:

1. ``conv2d(x) * s`` (either operand order, ``torch.mul``/``*``/``.mul``), `s` a channel scale:
   the conv and the mul become one ``masked_conv2d(x, W, b, s, hard=mode == "hard")``; `s` is the
   op's out_mask, its gradient follows the mode (see `fxprune.kernels`).
2. ``conv2d -> (BatchNorm2d | ReLU-like)* -> mul(s)`` where `s` has constant factors (Gate
   Decorator's ``BN -> * (gate * mask)``): only the conv becomes masked, with out_mask =
   ``(product of the constant factors != 0)``; the BN and the mul stay. Exact: a channel whose
   constant factor is zero is multiplied by zero after the BN anyway; the BN sees an all-zero
   channel, whose batch statistics are finite (mean 0, var 0, eps > 0), and no gradient reaches
   the channel either way (it is multiplied by zero). Only that channel's BN running statistics
   differ, and it is pruned.
3. Input masks: the input of a masked conv (or of any other eligible conv, which then becomes a
   masked conv with out_mask = 1: pattern ``input_only``) that comes from such a mul (or, in hard mode, from a
   pattern-1 masked conv) through zero-preserving channelwise ops (ReLU, pooling, dropout...) and
   residual adds (zero where every operand is zero) has exact zeros in the channels the masks
   zero, so the op skips them (``in_mask``). The upstream gradient into those channels would have
   been multiplied by that zero, so training is unchanged.

4. With ``compact=True``, first: compact regions (`passes.compact_chain`, pattern "compact").
   A region's producers are ``conv -> [BatchNorm2d] -> * s`` with constant factors in `s` and the
   conv ungrouped (its output read by that chain only); its tensors are everything reachable from
   them through width-free steps (zero-preserving, per channel, no dropout) and adds whose
   operands are all region tensors (a residual stream); its live channels are those some
   producer's constant factors keep. A region that an ungrouped conv reads runs compact: each
   producer's conv becomes a `compact_chain.compact_conv` node computing the live channels (BN and
   scale included), each reading conv a `compact_conv` on the live input columns (a conv both
   reads and writes compact tensors in the middle of a chain or at a block's first conv), and
   every other reader (flatten, cat, a grouped conv, the output) gets the dense tensor back
   through `compact_chain.expand_channels` (record pattern "compact_expand").

Not fused, and why:

* a mask that is trainable (a parameter that requires grad) and sits after a BatchNorm or another op: in
  train mode the BN renormalises, so the scale cannot move into the conv; handing its zeros to the
  conv would change the parameter's gradient at zero entries (BN(0) instead of BN(conv));
* a conv whose output has other users than the chain (a skipped channel would leak to them);
* scales that depend on the input (squeeze-excitation gates), or whose dtype differs from the
  conv's (the mul would promote), or that do not broadcast per channel;
* `F.conv2d` calls, Conv1d/Conv3d, transposed convs, padding modes other than zeros,
  ``padding="same"`` with an even dilated kernel, Conv2d subclasses that override `forward`.

Example::

    >>> fused = fuse_masked_convs(gated.module, mode="hard")
    >>> fused.meta["fxprune_masked_convs"]      # what was fused, and how
    [{'conv': 'layer1_0_conv1', 'pattern': 'after_norm', 'in_mask': False}, ...]
    >>> torch.allclose(fused(x), gated.module(x))
    True
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

import fxprune.kernels  # noqa: F401  (registers torch.ops.fxprune.masked_conv2d)
from fxprune.errors import ConfigError, InputError

from .compact_chain import LiveChannels, compact_conv, expand_channels, live_channels

MODES = ("hard", "soft")
META = "fxprune_masked_convs"

_MUL_FUNCS = (torch.mul, operator.mul, torch.Tensor.mul)
_RESHAPE_FUNCS = (torch.reshape,)
_RESHAPE_METHODS = ("reshape", "view")
# f(0) is finite, applied per channel (pattern 2 may pass through them between conv and mul)
_FINITE_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.SiLU, nn.GELU,
                   nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Mish, nn.PReLU)
# f(0) == 0, per channel (input masks may look through them)
_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.SiLU, nn.GELU, nn.ELU, nn.Tanh,
                 nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d, nn.Mish)
_ZERO_FUNCS = (torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.hardtanh,
               torch.nn.functional.hardswish, torch.nn.functional.silu, torch.nn.functional.gelu,
               torch.nn.functional.elu, torch.nn.functional.leaky_relu, torch.tanh, torch.nn.functional.dropout,
               torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
               torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d)
_ZERO_METHODS = ("relu", "tanh", "contiguous")
_FINITE_FUNCS = _ZERO_FUNCS + (torch.sigmoid, torch.nn.functional.hardsigmoid)
# the zero-preserving ops without dropout: they run unchanged on a compact tensor (pattern 4), and
# dropout's random draws would differ from the dense tensor's
_WIDTH_FREE_MODULES = tuple(m for m in _ZERO_MODULES if m not in (nn.Dropout, nn.Dropout2d))
_WIDTH_FREE_FUNCS = tuple(f for f in _ZERO_FUNCS if f is not torch.nn.functional.dropout)
_FINITE_METHODS = _ZERO_METHODS + ("sigmoid",)


@dataclass
class _Factor:
    node: fx.Node  # a constant expression (get_attr leaves only)
    reshapes: tuple  # reshape targets applied to it, innermost first
    constant: bool  # built from buffers and frozen parameters only


class _Scales:
    """Recognises channel scales: constant expressions, evaluated once for their shapes and dtypes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.values: dict[fx.Node, object] = {}
        self.const: dict[fx.Node, bool] = {}
        self.trainable: dict[fx.Node, bool] = {}

    def is_const(self, node) -> bool:
        if not isinstance(node, fx.Node):
            return True
        if node not in self.const:
            ok = node.op == "get_attr" or (node.op in ("call_function", "call_method")
                                           and all(self.is_const(a) for a in node.all_input_nodes))
            self.const[node] = ok
        return self.const[node]

    def has_trainable(self, node: fx.Node) -> bool:
        """The expression reads a parameter that requires grad."""
        if node not in self.trainable:
            if node.op == "get_attr":
                v = self.value(node)
                self.trainable[node] = isinstance(v, nn.Parameter) and v.requires_grad
            else:
                self.trainable[node] = any(self.has_trainable(a) for a in node.all_input_nodes)
        return self.trainable[node]

    def value(self, node):
        if not isinstance(node, fx.Node):
            return node
        if node not in self.values:
            if node.op == "get_attr":
                v = self.gm
                for part in node.target.split("."):
                    v = getattr(v, part)
            else:
                args = fx.node.map_arg(node.args, self.value)
                kwargs = fx.node.map_arg(node.kwargs, self.value)
                with torch.no_grad():
                    if node.op == "call_function":
                        v = node.target(*args, **kwargs)
                    else:
                        v = getattr(args[0], node.target)(*args[1:], **kwargs)
            self.values[node] = v
        return self.values[node]

    def tensor(self, node) -> torch.Tensor | None:
        if not (isinstance(node, fx.Node) and self.is_const(node)):
            return None
        try:
            v = self.value(node)
        except Exception:  # an expression we cannot evaluate is not a scale we recognise
            return None
        return v if isinstance(v, torch.Tensor) else None

    def factors(self, node: fx.Node, reshapes: tuple = ()) -> list[_Factor]:
        """Leaves of the product tree under `node` (reshapes pushed through same-shape products)."""
        if _is_mul(node) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return self.factors(node.args[0], reshapes) + self.factors(node.args[1], reshapes)
        inner = _reshape_input(node)
        if inner is not None and _is_mul(inner) and all(isinstance(a, fx.Node) for a in inner.args[:2]):
            a, b = (self.tensor(x) for x in inner.args[:2])
            if a is not None and b is not None and a.shape == b.shape:
                return self.factors(inner, (_reshape_target(node),) + reshapes)
        return [_Factor(node, reshapes, not self.has_trainable(node))]

    def channel_scale(self, node, channels: int, like: torch.Tensor) -> list[_Factor] | None:
        """The factors of `node` if it is a channel scale for `channels` channels (else None)."""
        s = self.tensor(node)
        if s is None or s.dtype != like.dtype or s.device != like.device or not _per_channel(s.shape, channels):
            return None
        factors = self.factors(node)
        for f in factors:
            v = self.tensor(f.node)
            if v is None:
                return None
            for shape in f.reshapes:
                v = v.reshape(shape)
            if not _per_channel(v.shape, channels):
                return None
        return factors


def _is_mul(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in _MUL_FUNCS and len(node.args) == 2 and not node.kwargs:
        return True
    return node.op == "call_method" and node.target == "mul" and len(node.args) == 2 and not node.kwargs


def _is_add(node) -> bool:
    if node.op == "call_function" and node.target in (torch.add, operator.add, operator.iadd):
        return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    return (node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args))


def _reshape_target(node: fx.Node):
    rest = node.args[1:]
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)


def _reshape_input(node: fx.Node) -> fx.Node | None:
    is_fn = node.op == "call_function" and node.target in _RESHAPE_FUNCS
    is_method = node.op == "call_method" and node.target in _RESHAPE_METHODS
    if (is_fn or is_method) and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _per_channel(shape, channels: int) -> bool:
    """Broadcasts against [N, C, H, W] as one value per channel (or one value for all)."""
    if len(shape) > 4:
        return False
    full = (1,) * (4 - len(shape)) + tuple(shape)
    return full[0] == 1 and full[2] == 1 and full[3] == 1 and full[1] in (1, channels)


def _conv_geometry(mod: nn.Module) -> tuple | None:
    """(stride, padding, dilation, groups) of a Conv2d the op can replace, else None."""
    if not isinstance(mod, nn.Conv2d) or type(mod).forward is not nn.Conv2d.forward:
        return None
    if mod.padding_mode != "zeros" or not mod.weight.dtype.is_floating_point:
        return None
    padding = mod.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
        if any(t % 2 for t in total):
            return None
        padding = tuple(t // 2 for t in total)
    return list(mod.stride), list(padding), list(mod.dilation), mod.groups


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


class _Fuser:
    def __init__(self, gm: fx.GraphModule, mode: str, cache_live: bool = False):
        self.gm, self.graph, self.mode, self.cache_live = gm, gm.graph, mode, cache_live
        self.scales = _Scales(gm)
        self.fused: dict[fx.Node, dict] = {}  # op node -> record
        self.out_vec: dict[fx.Node, fx.Node] = {}  # pattern-1 op node -> its out_mask vector node
        self.stale: set[fx.Node] = set()
        self.compacted: list[dict] = []  # pattern "compact" records
        self.replaced: dict[fx.Node, fx.Node] = {}  # a compact region producer's mul -> its compact_conv

    # ---- recognition -------------------------------------------------------------------------
    def conv(self, node) -> tuple[nn.Conv2d, tuple] | None:
        if not (isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs):
            return None
        mod = self.gm.get_submodule(node.target)
        geometry = _conv_geometry(mod)
        return None if geometry is None else (mod, geometry)

    def finite_step(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if isinstance(mod, nn.BatchNorm2d):
                return mod.eps > 0
            return isinstance(mod, _FINITE_MODULES)
        if node.op == "call_function":
            return node.target in _FINITE_FUNCS
        return node.op == "call_method" and node.target in _FINITE_METHODS

    def zero_step(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), _ZERO_MODULES)
        if node.op == "call_function":
            return node.target in _ZERO_FUNCS
        return node.op == "call_method" and node.target in _ZERO_METHODS

    # ---- emission ------------------------------------------------------------------------------
    def copy_const(self, node: fx.Node, env: dict) -> fx.Node:
        """Copy a constant expression at the current insertion point (so it precedes its user)."""
        if node not in env:
            for a in node.all_input_nodes:
                self.copy_const(a, env)
            env[node] = self.graph.node_copy(node, lambda a: env[a])
            self.stale.add(node)
        return env[node]

    def vector(self, factors: list[_Factor], channels: int, env: dict) -> fx.Node:
        """[C] vector of the product of `factors` (emitted at the insertion point)."""
        out = None
        for f in factors:
            n = self.copy_const(f.node, env)
            for shape in f.reshapes:
                n = self.graph.call_function(torch.reshape, (n, shape))
            out = n if out is None else self.graph.call_function(torch.mul, (out, n))
        out = self.graph.call_function(torch.broadcast_to, (out, (1, channels, 1, 1)))
        return self.graph.call_function(torch.reshape, (out, (channels,)))

    def union(self, vecs: list[fx.Node]) -> fx.Node:
        """A [C] vector that is zero exactly where every vector of `vecs` is (|v1| + |v2| + ...)."""
        total = vecs[0]
        for v in vecs[1:]:
            total = self.graph.call_function(torch.add, (self.graph.call_function(torch.abs, (total,)),
                                                         self.graph.call_function(torch.abs, (v,))))
        return total

    def binary(self, vec: fx.Node, like: fx.Node) -> fx.Node:
        ne = self.graph.call_function(torch.ne, (vec, 0))
        return self.graph.call_method("type_as", (ne, like))

    def emit_op(self, conv_node: fx.Node, mod: nn.Conv2d, geometry, mask_of) -> fx.Node:
        stride, padding, dilation, groups = geometry
        w = self.graph.get_attr(f"{conv_node.target}.weight")
        b = self.graph.get_attr(f"{conv_node.target}.bias") if mod.bias is not None else None
        mask = mask_of(w)
        return self.graph.call_function(torch.ops.fxprune.masked_conv2d.default,
                                        (conv_node.args[0], w, b, mask, stride, padding, dilation, groups),
                                        {"in_mask": None, "hard": self.mode == "hard"})

    def remembered_live(self, vec: fx.Node, sources: tuple) -> fx.Node:
        """A `LiveChannels` call (a new submodule) giving the live indices of the [C] vector `vec`,
        remembered while the tensors `sources` keep their identity and version."""
        name = "fxprune_live_0"
        while hasattr(self.gm, name):
            name = f"fxprune_live_{int(name.rsplit('_', 1)[1]) + 1}"
        self.gm.add_submodule(name, LiveChannels())
        return self.graph.call_module(name, (vec, *sources))

    def mask_sources(self, vec: fx.Node) -> tuple | None:
        """The tensors a mask vector of the op is computed from (its `get_attr` leaves; none for
        the all-ones out_mask of pattern "input_only", which never changes), or None if it reads
        anything else (then the op reads the mask itself)."""
        if vec.op == "call_method" and vec.target == "new_ones":
            return ()
        leaves, stack, seen = [], [vec], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.op == "get_attr":
                leaves.append(node)
            elif node.op in ("call_function", "call_method"):
                stack.extend(node.all_input_nodes)
            else:
                return None
        return tuple(leaves)

    def remember_op_live_sets(self) -> None:
        """`cache_live`: each masked op gets its masks' live indices from a `LiveChannels` (`out_live`,
        `in_live`), so it reads no mask values while the masks keep their versions (no host
        synchronisation per call on a GPU; on a CPU the live set is not derived again each call)."""
        for op in [n for n in self.graph.nodes if n in self.fused]:
            lives = {}
            for kwarg, vec in (("out_live", op.args[3]), ("in_live", op.kwargs.get("in_mask"))):
                sources = None if vec is None else self.mask_sources(vec)
                if sources is not None:
                    with self.graph.inserting_before(op):
                        lives[kwarg] = self.remembered_live(vec, sources)
            for kwarg, node in lives.items():
                op.update_kwarg(kwarg, node)

    # ---- patterns ------------------------------------------------------------------------------
    def width_free(self, node: fx.Node, source: fx.Node) -> bool:
        """`node` applies an elementwise f(0) == 0 to `source` alone (it can run on a compact tensor)."""
        if not node.args or node.args[0] is not source or any(
                isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return False
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), _WIDTH_FREE_MODULES)
        return node.op == "call_function" and node.target in _WIDTH_FREE_FUNCS

    def compact_source(self, mul: fx.Node) -> dict | None:
        """A producer of a compact region: conv -> [BatchNorm2d] -> * s, with constant factors in
        `s`, the conv ungrouped or depthwise and read only by the BatchNorm (or the mul), the
        BatchNorm by the mul. A depthwise producer ("depthwise": True) joins the region its input
        belongs to (`compact_regions`), else it is none."""
        for i in (0, 1):
            node, s_node = mul.args[i], mul.args[1 - i]
            norm = None
            if (isinstance(node, fx.Node) and node.op == "call_module" and _single_user(node) and len(node.args) == 1
                    and not node.kwargs and isinstance(self.gm.get_submodule(node.target), nn.BatchNorm2d)):
                norm, node = node, node.args[0]
            found = self.conv(node)
            if found is None or not _single_user(node):
                continue
            depthwise = found[1][3] == found[0].in_channels == found[0].out_channels > 1
            if found[1][3] != 1 and not depthwise:
                continue
            channels = found[0].out_channels
            if norm is not None and (self.gm.get_submodule(norm.target).num_features != channels
                                     or self.gm.get_submodule(norm.target).eps <= 0):
                continue
            const = [f for f in self.scales.channel_scale(s_node, channels, found[0].weight) or [] if f.constant]
            if const:
                return {"conv": node, "norm": norm, "mul": mul, "scale": s_node, "const": const, "channels": channels,
                        "depthwise": depthwise}
        return None

    def sink(self, node: fx.Node, member: fx.Node, channels: int) -> bool:
        """`node` is an ungrouped conv that reads `member` (a region tensor) as its input."""
        found = self.conv(node)
        return (found is not None and node.args[0] is member and found[1][3] == 1
                and found[0].in_channels == channels)

    def compact_regions(self) -> list[dict]:
        """The graph's compact regions (`passes.compact_chain`): tensors reachable from region
        producers through width-free steps and adds of region tensors, grouped into connected
        regions; only regions that at least one conv reads are kept (elsewhere the masked op of
        patterns 1-3 does as well).

        A depthwise producer (MobileNet's ``dw conv -> BN -> * s`` after an expand conv) whose input
        is a region tensor of its width joins that region: it reads the region's live channels and
        writes them (channel c of a depthwise conv reads only channel c). Exact with the region's
        live set the union of every producer's: a channel only the input's producer keeps is
        zeroed by the depthwise producer's own scale, one only the depthwise producer keeps reads
        the exact zeros the input has there, as the plain graph does."""
        sources, root, width = {}, {}, {}

        def find(n):
            while root[n] is not n:
                root[n] = root[root[n]]
                n = root[n]
            return n

        for node in self.graph.nodes:  # topological order: operands are classified before their users
            src = self.compact_source(node) if _is_mul(node) else None
            if src is not None and src["depthwise"]:
                into = src["conv"].args[0]
                src = src if into in root and width[into] == src["channels"] else None
            if src is not None:
                sources[node], root[node], width[node] = src, node, src["channels"]
                if src["depthwise"]:
                    root[node] = find(src["conv"].args[0])
            elif (node.op in ("call_module", "call_function") and node.args and node.args[0] in root
                  and self.width_free(node, node.args[0])):
                root[node] = find(node.args[0])
                width[node] = width[node.args[0]]
            elif _is_add(node) and all(a in root for a in node.args) and width[node.args[0]] == width[node.args[1]]:
                a, b = find(node.args[0]), find(node.args[1])
                root[b] = a
                root[node], width[node] = a, width[node.args[0]]
        depthwise_readers = {src["conv"] for src in sources.values() if src["depthwise"]}
        regions: dict[fx.Node, dict] = {}
        for node in root:
            r = regions.setdefault(find(node), {"members": [], "sources": [], "sinks": [], "readers": {},
                                                "channels": width[node]})
            r["members"].append(node)
            if node in sources:
                r["sources"].append(sources[node])
            for user in node.users:
                if user in root or user in depthwise_readers:  # a depthwise producer reads its own region
                    continue
                if self.sink(user, node, width[node]):
                    r["sinks"].append(user)
                else:
                    r["readers"].setdefault(node, []).append(user)
        return [r for r in regions.values() if r["sinks"]]

    def compact(self) -> None:
        """Every compact region of the graph: its producers' convs and its reader convs become
        `compact_conv` nodes (a conv both, the middle of a VGG chain or a ResNet block's first conv
        reading the stream, reads and writes compact tensors), its other readers get
        `expand_channels`."""
        regions = self.compact_regions()
        out_of = {src["conv"]: (src, r) for r in regions for src in r["sources"]}
        into = {conv: r for r in regions for conv in r["sinks"]}
        into.update({src["conv"]: r for r in regions for src in r["sources"] if src["depthwise"]})
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for r in regions:  # the live channels: what some producer keeps (before the first producer)
            with self.graph.inserting_before(min((s["conv"] for s in r["sources"]), key=order.__getitem__)):
                envs = [{} for _ in r["sources"]]
                vecs = [self.vector(s["const"], r["channels"], env) for s, env in zip(r["sources"], envs)]
                total = self.union(vecs)
                if self.cache_live:  # remembered while the masks keep their versions (`LiveChannels`)
                    leaves = tuple(dict.fromkeys(n for env in envs for n in env.values() if n.op == "get_attr"))
                    r["live"] = self.remembered_live(total, leaves)
                else:
                    r["live"] = self.graph.call_function(live_channels, (total,))
        for conv in [n for n in self.graph.nodes if n in out_of or n in into]:
            mod = self.gm.get_submodule(conv.target)
            stride, padding, dilation, groups = _conv_geometry(mod)
            src, r_out = out_of.get(conv, (None, None))
            r_in = into.get(conv)
            with self.graph.inserting_before(conv):
                vec = None if src is None else self.vector([_Factor(src["scale"], (), False)], src["channels"], {})
                w = self.graph.get_attr(f"{conv.target}.weight")
                b = self.graph.get_attr(f"{conv.target}.bias") if mod.bias is not None else None
                norm = None if src is None or src["norm"] is None else self.graph.get_attr(src["norm"].target)
                new = self.graph.call_function(compact_conv, (
                    conv.args[0], None if r_in is None else r_in["live"], None if r_out is None else r_out["live"],
                    w, b, stride, padding, dilation, vec, norm, groups))
            (src["mul"] if src is not None else conv).replace_all_uses_with(new)
            if src is not None:
                self.replaced[src["mul"]] = new
            for n in (src["mul"], src["norm"]) if src is not None else ():
                if n is not None:
                    self.graph.erase_node(n)
            self.graph.erase_node(conv)
            if src is not None:
                self.stale.add(src["scale"])
            self.compacted.append({"conv": conv.name, "pattern": "compact", "in_mask": r_in is not None,
                                   "out_compact": src is not None, "node": new.name,
                                   "norm": None if norm is None else norm.target})
        for r in regions:  # readers that need every channel
            for member, readers in r["readers"].items():
                member = self.replaced.get(member, member)
                with self.graph.inserting_before(min(readers, key=order.__getitem__)):
                    dense = self.graph.call_function(expand_channels, (member, r["live"], r["channels"]))
                for reader in readers:
                    reader.replace_input_with(member, dense)
                self.compacted.append({"conv": None, "pattern": "compact_expand", "in_mask": False,
                                       "node": dense.name, "readers": [u.name for u in readers]})

    def try_scale(self, mul: fx.Node) -> bool:
        """Pattern 1: conv(x) * s -> masked_conv2d(x, W, b, s)."""
        for i in (0, 1):
            conv_node, s_node = mul.args[i], mul.args[1 - i]
            found = self.conv(conv_node)
            if found is None or not _single_user(conv_node):
                continue
            mod, geometry = found
            factors = self.scales.channel_scale(s_node, mod.out_channels, mod.weight)
            if factors is None:
                continue
            with self.graph.inserting_before(mul):
                vec = self.vector([_Factor(s_node, (), False)], mod.out_channels, {})
                op = self.emit_op(conv_node, mod, geometry, lambda w: vec)
            mul.replace_all_uses_with(op)
            self.graph.erase_node(mul)
            self.graph.erase_node(conv_node)
            self.stale.add(s_node)
            self.fused[op] = {"conv": conv_node.name, "pattern": "scale", "in_mask": False}
            self.out_vec[op] = vec
            return True
        return False

    def try_after_norm(self, mul: fx.Node) -> bool:
        """Pattern 2: conv -> BN/activations -> * s with constant factors: the conv gets out_mask."""
        for i in (0, 1):
            node, s_node = mul.args[i], mul.args[1 - i]
            chain = []
            while isinstance(node, fx.Node) and self.conv(node) is None:
                if node.op not in ("call_module", "call_function", "call_method") or not self.finite_step(node):
                    break
                if not _single_user(node) or not node.args or not isinstance(node.args[0], fx.Node):
                    break
                chain.append(node)
                node = node.args[0]
            found = self.conv(node)
            if not chain or found is None or not _single_user(node):
                continue
            mod, geometry = found
            if any(not self.channelwise(n, mod.out_channels) for n in chain):
                continue
            factors = self.scales.channel_scale(s_node, mod.out_channels, mod.weight)
            const = [f for f in factors or [] if f.constant]
            if not const:
                continue
            with self.graph.inserting_before(node):
                vec = self.vector(const, mod.out_channels, {})
                op = self.emit_op(node, mod, geometry, lambda w: self.binary(vec, w))
            node.replace_all_uses_with(op)
            self.graph.erase_node(node)
            self.fused[op] = {"conv": node.name, "pattern": "after_norm", "in_mask": False}
            return True
        return False

    def channelwise(self, node: fx.Node, channels: int) -> bool:
        """The step takes its tensor as the only tensor input (BN: of the right width)."""
        if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return False
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if isinstance(mod, nn.BatchNorm2d):
                return mod.num_features == channels
            if isinstance(mod, nn.PReLU):
                return mod.num_parameters in (1, channels)
        return True

    def zero_sources(self, node, channels: int, like: torch.Tensor, seen: dict) -> list | None:
        """Vectors v_1..v_k such that channel c of `node` is exactly zero wherever every v_i[c] == 0.

        Each v is ("vec", node) (an existing [C] vector) or ("const", factors) (constant factors of
        a mask, still to be emitted). None: no such guarantee.
        """
        if not isinstance(node, fx.Node) or node.op == "placeholder":
            return None
        if node in seen:
            return seen[node]
        seen[node] = None  # cycles cannot happen in a DAG; this also caches failures
        found = None
        if node in self.out_vec and self.mode == "hard":
            found = [("vec", self.out_vec[node])]
        elif _is_mul(node):
            for i in (0, 1):
                data, scale = node.args[i], node.args[1 - i]
                if not isinstance(data, fx.Node) or self.scales.is_const(data):
                    continue
                const = [f for f in self.scales.channel_scale(scale, channels, like) or [] if f.constant]
                if const:
                    found = [("const", const)]
                    break
        elif _is_add(node):
            a = self.zero_sources(node.args[0], channels, like, seen)
            b = self.zero_sources(node.args[1], channels, like, seen) if a is not None else None
            found = None if b is None else a + b
        elif self.zero_step(node) and node.args and isinstance(node.args[0], fx.Node) and not any(
                isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            found = self.zero_sources(node.args[0], channels, like, seen)
        seen[node] = found
        return found

    def try_in_mask(self, op: fx.Node, seen: dict) -> None:
        """Pattern 3: skip the input channels that upstream masks zero."""
        w = op.args[1]  # weight get_attr
        weight = self.scales.value(w)
        channels = weight.shape[1] * op.args[7]
        sources = self.zero_sources(op.args[0], channels, weight, seen)
        if not sources:
            return
        with self.graph.inserting_before(op):
            vecs = [v if kind == "vec" else self.vector(v, channels, {}) for kind, v in sources]
            total = self.union(vecs)
            op.update_kwarg("in_mask", self.binary(total, w))
        self.fused[op]["in_mask"] = True

    def try_input_only(self, node: fx.Node) -> None:
        """Pattern 4 (candidate): any other conv becomes a masked conv with out_mask = 1, kept only
        if pattern 3 finds zero input channels for it (`restore` undoes it otherwise)."""
        found = self.conv(node)
        if found is None:
            return
        mod, geometry = found
        with self.graph.inserting_before(node):
            op = self.emit_op(node, mod, geometry,
                              lambda w: self.graph.call_method("new_ones", (w, (mod.out_channels,))))
        op.meta["fxprune_conv"] = node
        node.replace_all_uses_with(op)
        self.fused[op] = {"conv": node.name, "pattern": "input_only", "in_mask": False}

    def restore(self, op: fx.Node) -> None:
        conv = op.meta.pop("fxprune_conv")
        op.replace_all_uses_with(conv)
        w, b, ones = op.args[1], op.args[2], op.args[3]
        self.graph.erase_node(op)
        for n in (ones, w, b):
            if isinstance(n, fx.Node) and not n.users:
                self.graph.erase_node(n)
        del self.fused[op]

    def drop_stale(self) -> None:
        """Erase the scale expressions the rewrite left without users."""
        pending, erased = list(self.stale), set()
        while pending:
            node = pending.pop()
            if node in erased or node.users or node.op not in ("get_attr", "call_function", "call_method"):
                continue
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            erased.add(node)
            pending.extend(inputs)

    def run(self, compact: bool = False) -> list[dict]:
        if compact:
            self.compact()
        for node in list(self.graph.nodes):
            if _is_mul(node) and not self.try_scale(node):
                self.try_after_norm(node)
        for node in list(self.graph.nodes):
            self.try_input_only(node)
        seen: dict = {}
        for op in list(self.fused):
            self.try_in_mask(op, seen)
        for op in [op for op, r in self.fused.items() if r["pattern"] == "input_only"]:
            if self.fused[op]["in_mask"]:
                self.graph.erase_node(op.meta.pop("fxprune_conv"))
            else:
                self.restore(op)
        if self.cache_live:
            self.remember_op_live_sets()
        self.drop_stale()
        return self.compacted + [self.fused[op] | {"node": op.name} for op in self.graph.nodes if op in self.fused]


def fuse_masked_convs(gm: fx.GraphModule, *, mode: str, compact: bool = False,
                      cache_live: bool = False) -> fx.GraphModule:
    """A copy of `gm` with mask multiplications fused into ``masked_conv2d`` (see module docstring).

    `mode` is the gradient semantics of zero-mask channels in pattern 1: ``"hard"`` (zero means
    pruned, no gradient; Gate Decorator) or ``"soft"`` (mask gradient everywhere; GAL's FISTA).
    `compact` first runs every compact region (masked channels between convs, residual streams
    included) on its live channels only (pattern "compact", `passes.compact_chain`); the other
    patterns then apply to the rest. `cache_live` remembers each region's live channels, and each
    masked op's (handed to it as ``out_live`` / ``in_live``), while the masks keep their version
    counters (`compact_chain.LiveChannels`: no host synchronisation per region, op and step on a
    GPU); the masks must then be written in place (``copy_``, indexing), never through ``.data``,
    which Gate Decorator and GAL respect.
    """
    if mode not in MODES:
        raise ConfigError(f"fuse_masked_convs: unknown mode {mode!r}: choose 'hard' (zero means pruned, "
                          "Gate Decorator) or 'soft' (mask gradient everywhere, GAL)")
    if not isinstance(gm, fx.GraphModule):
        raise InputError(f"fuse_masked_convs takes a torch.fx.GraphModule, got {type(gm).__name__}; "
                         "trace the model first (fxprune.trace(model).graph_module)")
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    new.training = gm.training
    records = _Fuser(new, mode, cache_live).run(compact=compact)
    new.graph.lint()
    new.recompile()
    new.meta[META] = records
    return new
