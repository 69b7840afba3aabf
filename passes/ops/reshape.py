"""Shape ops: view/reshape/flatten/unflatten/squeeze/unsqueeze, permute/transpose, expand.

A reshape keeps channels prunable when the channel dim lands whole inside one output dim, merged
with neighbours (flatten before a Linear: `ids` repeat H*W times). Removing channels then removes
whole runs of that output dim and keeps the order, so the rewrite only changes the size literal
of that dim. A reshape that splits the channel dim over several dims (channel shuffle) is a
boundary: an arbitrary keep-set cannot be regrouped that way.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..context import Layout
from .registry import OpHandler, register_function, register_method, register_module


def merged_position(in_shape, out_shape, c: int):
    """(output dim, lead factor, trail factor) if input dim `c` lands whole in one output dim."""
    before, through = math.prod(in_shape[:c]), math.prod(in_shape[:c + 1])
    for j in range(len(out_shape)):
        lo, hi = math.prod(out_shape[:j]), math.prod(out_shape[:j + 1])
        if lo <= before and hi >= through and before % lo == 0 and hi % through == 0:
            return j, before // lo, hi // through
    return None


def reshape_layout(ctx, node, x) -> Layout | None:
    lay = ctx.layout(x)
    if not isinstance(lay, Layout):
        return None
    in_shape, out_shape = ctx.spec(x).shape, ctx.spec(node).shape
    found = merged_position(in_shape, out_shape, lay.dim)
    if found is None:
        ctx.boundary(node, "reshape splits the channel dim over several dims (e.g. channel shuffle)")
        return None
    j, lead, trail = found
    return Layout(j, np.tile(np.repeat(lay.ids, trail), lead))


_VIEWS = ("view", "reshape")


@register_method(*_VIEWS)
@register_function(torch.reshape)
class ViewReshape(OpHandler):
    """x.view(*shape), x.reshape(shape), torch.reshape(x, shape)."""

    @staticmethod
    def _shape_args(node):
        rest = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            return list(rest[0]), True
        return list(rest), False

    def analyze(self, ctx, node):
        return reshape_layout(ctx, node, node.args[0])

    def rewrite(self, rctx, node):
        lay = rctx.layout(node)
        if lay is None:
            return
        shape, packed = self._shape_args(node)
        if "shape" in node.kwargs or not shape:
            shape, packed = list(node.kwargs.get("shape", ())), None
        entry = shape[lay.dim] if lay.dim < len(shape) else None
        if not isinstance(entry, int) or entry == -1:
            return  # -1 or a runtime size adapts by itself
        shape[lay.dim] = entry * rctx.kept_count(lay.ids) // len(lay.ids)
        if packed is None:
            node.kwargs = {**node.kwargs, "shape": tuple(shape)}
        elif node.op == "call_method":
            node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)
        else:
            node.args = (node.args[0], tuple(shape), *node.args[2:])


@register_method("flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_")
@register_function(torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten)
@register_module(nn.Flatten, nn.Unflatten)
class MergeOrSplitDims(OpHandler):
    """Shape ops without size literals on the channel dim (sizes come from the tensor)."""

    def analyze(self, ctx, node):
        return reshape_layout(ctx, node, node.args[0])


def _permutation(node, ndim):
    if node.target in ("permute", torch.permute):
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        return [d % ndim for d in dims]
    if node.target in ("t",):
        return [1, 0][:ndim] if ndim == 2 else list(range(ndim))
    a, b = (node.args[1], node.args[2])
    perm = list(range(ndim))
    if node.target in ("movedim", torch.movedim):
        src, dst = a % ndim, b % ndim
        perm.pop(src)
        perm.insert(dst, src)
        return perm
    perm[a % ndim], perm[b % ndim] = perm[b % ndim], perm[a % ndim]
    return perm


@register_method("permute", "transpose", "transpose_", "movedim", "t", "swapaxes", "swapdims")
@register_function(torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.swapdims)
class Permute(OpHandler):
    def analyze(self, ctx, node):
        lay = ctx.layout(node.args[0])
        if not isinstance(lay, Layout):
            return None
        perm = _permutation(node, ctx.spec(node.args[0]).ndim)
        if any(not isinstance(p, int) for p in perm):
            ctx.boundary(node, "permutation computed at run time")
            return None
        return Layout(perm.index(lay.dim), lay.ids)


@register_method("expand", "expand_as", "repeat", "tile")
@register_function(torch.tile)
class Expand(OpHandler):
    """Broadcasting copies along other dims keep channels; repeating the channel dim does not."""

    def analyze(self, ctx, node):
        lay = ctx.layout(node.args[0])
        if not isinstance(lay, Layout):
            return None
        in_nd, out = ctx.spec(node.args[0]).ndim, ctx.spec(node)
        d = lay.dim + out.ndim - in_nd
        if out.shape[d] != len(lay.ids):
            ctx.boundary(node, "repeats the channel dim")
            return None
        return Layout(d, lay.ids)


_SHAPE_OPS = {"view", "reshape", "expand", "flatten", "unflatten", torch.reshape}


def _only_shapes(node: fx.Node) -> bool:
    """The value only feeds shape arguments, which follow the slim tensor at run time."""
    return all(user.target in _SHAPE_OPS for user in node.users)


def _channel_count_escapes(size_node: fx.Node, channel_dim: int) -> bool:
    """`x.size()`/`x.shape` whose channel entry reaches arithmetic (`x / c`)."""
    for user in size_node.users:
        if user.target is operator.getitem:
            if user.args[1] == channel_dim and not _only_shapes(user):
                return True
        elif user.target not in _SHAPE_OPS:
            return True
    return False


@register_method("size", "dim", "numel", "ndimension", "nelement")
@register_function(getattr, torch.numel)
class SizeRead(OpHandler):
    """Reading sizes is harmless unless code computes with the channel count (`x / x.size(1)`)."""

    def analyze(self, ctx, node):
        lay = ctx.layout(node.args[0])
        spec = ctx.spec(node.args[0])
        if isinstance(lay, tuple) and node.target is getattr and hasattr(spec, "_fields"):
            return lay[spec._fields.index(node.args[1])]  # a namedtuple field
        if not isinstance(lay, Layout):
            return None
        if node.target is getattr and ctx.is_tensor(node):
            ctx.boundary(node, f"tensor attribute .{node.args[1]}")
            return None
        if node.target in ("dim", "ndimension") or (node.target is getattr and node.args[1] != "shape"):
            return None
        if node.target in ("numel", "nelement", torch.numel):
            ctx.mark(lay.ids, f"{node.name}: code reads the element count")
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None:
            escapes = _channel_count_escapes(node, lay.dim)
        else:
            escapes = isinstance(dim, int) and dim % ctx.spec(node.args[0]).ndim == lay.dim and not _only_shapes(node)
        if escapes:
            ctx.mark(lay.ids, f"{node.name}: code computes with the channel count")
        return None
