"""Ops that join or cut tensors: cat/stack, split/chunk/unbind, indexing (`x[:, :64]`), narrow.

`cat` on the channel dim concatenates the inputs' ids with exact offsets; on another dim it
couples the inputs' channels. `split`/`chunk` on the channel dim give each piece its slice of
ids; the rewrite turns them into `torch.split` with the kept sizes, and an indexing slice gets
its bounds recounted.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from ..context import Layout
from .registry import OpHandler, get_arg, register_function, register_method, set_arg


def _parameter_slot(ctx, x, dim: int) -> tuple[str, int] | None:
    """(parameter, its dim) when `x` is a parameter, or one broadcast by `.expand(n, -1, -1)` (a
    ViT's class token), whose `dim` may be sliced with the channels it is joined to."""
    if not isinstance(x, fx.Node):
        return None
    if x.op == "call_method" and x.target == "expand" and isinstance(x.args[0], fx.Node):
        src, sizes = x.args[0], x.args[1:]
        sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
        if dim >= len(sizes) or sizes[dim] != -1:
            return None  # the channel count is written in the code
        dim -= ctx.spec(x).ndim - ctx.spec(src).ndim
        x = src
    if x.op == "get_attr" and x.target not in ctx.tainted and dim >= 0 and ctx.is_tensor(x):
        return x.target, dim
    return None


def _couple_same_dim(ctx, node, inputs, out_dim_of) -> Layout | None:
    """Inputs joined along a non-channel dim: their channels coincide in the output. A parameter
    input (a ViT's class token, possibly `.expand`ed over the batch) is sliced with them."""
    ids, d = None, None
    for x in inputs:
        lay = ctx.layout(x)
        if isinstance(lay, Layout) and ids is None:
            ids, d = lay.ids, lay.dim
    if ids is None:
        return None
    for x in inputs:
        lay = ctx.layout(x)
        slot = None if isinstance(lay, Layout) else _parameter_slot(ctx, x, d)
        if isinstance(lay, Layout) and lay.dim == d and len(lay.ids) == len(ids):
            ctx.couple(ids, lay.ids)
        elif slot is not None and ctx.spec(x).shape[d] == len(ids):
            ctx.member(slot[0], slot[1], ids, "channel", node)
        else:
            ctx.mark_all(lay, f"{node.name}: inputs have channels on different dims")
            ctx.mark(ids, f"{node.name}: an input's channels are not tracked")
    return Layout(out_dim_of(d), ids)


@register_function(torch.cat, torch.concat, torch.concatenate)
class Cat(OpHandler):
    def analyze(self, ctx, node):
        inputs = list(get_arg(node, 0, "tensors"))
        dim = get_arg(node, 1, "dim", 0) % ctx.spec(node).ndim
        channel_cat = any(isinstance(ctx.layout(x), Layout) and ctx.layout(x).dim == dim for x in inputs)
        if not channel_cat:
            return _couple_same_dim(ctx, node, inputs, lambda d: d)
        pieces = []
        for x in inputs:
            lay = ctx.layout(x)
            if isinstance(lay, Layout) and lay.dim == dim:
                pieces.append(lay.ids)
            else:
                ctx.mark_all(lay, f"{node.name}: concatenated input with channels on another dim")
                pieces.append(ctx.opaque_ids(ctx.spec(x).shape[dim], f"{node.name}: untracked cat input"))
        return Layout(dim, np.concatenate(pieces))

    def rewrite(self, rctx, node):
        lay = rctx.layout(node)
        dim = get_arg(node, 1, "dim", 0) % len(rctx.spec(node).shape)
        if lay is None or lay.dim != dim:
            return
        inputs = list(get_arg(node, 0, "tensors"))
        kept = [x for x in inputs
                if not isinstance(rctx.layout(x), Layout) or rctx.kept_count(rctx.layout(x).ids) > 0]
        if len(kept) != len(inputs):
            set_arg(node, 0, "tensors", kept)


@register_function(torch.stack)
class Stack(OpHandler):
    def analyze(self, ctx, node):
        inputs = list(get_arg(node, 0, "tensors"))
        dim = get_arg(node, 1, "dim", 0) % ctx.spec(node).ndim
        return _couple_same_dim(ctx, node, inputs, lambda d: d + (1 if dim <= d else 0))


def _split_dim(node) -> int:
    return get_arg(node, 2, "dim", 0)


@register_function(torch.split, torch.chunk, torch.tensor_split)
@register_method("split", "chunk", "tensor_split", "split_with_sizes")
class Split(OpHandler):
    def analyze(self, ctx, node):
        lay = ctx.layout(node.args[0])
        outs = ctx.spec(node)
        if not isinstance(lay, Layout):
            return None
        ndim = ctx.spec(node.args[0]).ndim
        dim = _split_dim(node)
        if not isinstance(dim, int):
            ctx.boundary(node, "split along a computed dim")
            return None
        if dim % ndim != lay.dim:
            return tuple(Layout(lay.dim, lay.ids) for _ in outs)
        pieces, start = [], 0
        for spec in outs:
            size = spec.shape[lay.dim]
            pieces.append(Layout(lay.dim, lay.ids[start:start + size]))
            start += size
        return tuple(pieces)

    def rewrite(self, rctx, node):
        lay = rctx.layout(node.args[0])
        pieces = rctx.layout(node)
        if lay is None or pieces is None or pieces[0].dim != lay.dim or _split_dim(node) % len(
                rctx.spec(node.args[0]).shape) != lay.dim:
            return
        sizes = [rctx.kept_count(p.ids) for p in pieces]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (node.args[0], sizes), {"dim": lay.dim}


@register_function(torch.unbind)
@register_method("unbind")
class Unbind(OpHandler):
    def analyze(self, ctx, node):
        lay = ctx.layout(node.args[0])
        if not isinstance(lay, Layout):
            return None
        dim = get_arg(node, 1, "dim", 0) % ctx.spec(node.args[0]).ndim
        if dim == lay.dim:
            ctx.boundary(node, "unbind along the channel dim")
            return None
        d = lay.dim - (1 if dim < lay.dim else 0)
        return tuple(Layout(d, lay.ids) for _ in ctx.spec(node))


def _index_items(index, ndim):
    """One entry per indexed dim (Ellipsis expanded, trailing dims filled); None for tensors/lists."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return None
    consumed = sum(1 for i in items if isinstance(i, (int, slice)))
    fill = [slice(None)] * (ndim - consumed)
    out = []
    for i in items:
        out.extend(fill if i is Ellipsis else [i])
    has_ellipsis = any(i is Ellipsis for i in items)
    return out if has_ellipsis else out + fill


def _locate_channel(items, channel_dim):
    """(item for the channel dim, output dim of the channels) walking an expanded index."""
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == channel_dim:
            return item, out_dim
        in_dim += 1
        if isinstance(item, slice):
            out_dim += 1
    return slice(None), out_dim + channel_dim - in_dim


@register_function(operator.getitem)
class GetItem(OpHandler):
    def analyze(self, ctx, node):
        src, index = node.args
        lay = ctx.layout(src)
        if isinstance(lay, (tuple, list)):
            return lay[index] if isinstance(index, int) else None
        if not isinstance(lay, Layout) or not ctx.is_tensor(src):
            return None
        items = _index_items(index, ctx.spec(src).ndim)
        if items is None:
            ctx.boundary(node, "indexing with tensors or lists")
            return None
        item, out_dim = _locate_channel(items, lay.dim)
        if isinstance(item, slice) and any(isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)):
            ctx.boundary(node, "channel slice with bounds computed at run time")
            return None
        if isinstance(item, int) or (isinstance(item, slice) and item.step not in (None, 1)):
            ctx.boundary(node, "indexing picks single or strided channels")
            return None
        return Layout(out_dim, lay.ids[item])

    def rewrite(self, rctx, node):
        src, index = node.args
        lay = rctx.layout(src)
        if not isinstance(lay, Layout) or rctx.layout(node) is None:
            return
        items = _index_items(index, len(rctx.spec(src).shape))
        item, _ = _locate_channel(items, lay.dim)
        if item == slice(None):
            return
        start, stop, _ = item.indices(len(lay.ids))
        new = slice(rctx.kept_count(lay.ids[:start]), rctx.kept_count(lay.ids[:stop]))
        pos = [i for i, it in enumerate(items) if it is not None]
        items = list(items)
        items[pos[lay.dim]] = new
        node.args = (src, tuple(items))


@register_function(torch.narrow)
@register_method("narrow")
class Narrow(OpHandler):
    def analyze(self, ctx, node):
        x, dim, start, length = node.args[:4]
        lay = ctx.layout(x)
        if not isinstance(lay, Layout):
            return None
        if not all(isinstance(v, int) for v in (dim, start, length)):
            ctx.boundary(node, "narrow with computed bounds")
            return None
        if dim % ctx.spec(x).ndim != lay.dim:
            return lay
        return Layout(lay.dim, lay.ids[start:start + length])

    def rewrite(self, rctx, node):
        x, dim, start, length = node.args[:4]
        lay = rctx.layout(x)
        if lay is None or dim % len(rctx.spec(x).shape) != lay.dim:
            return
        new_start = rctx.kept_count(lay.ids[:start])
        new_len = rctx.kept_count(lay.ids[start:start + length])
        node.args = (x, dim, new_start, new_len, *node.args[4:])
