"""Shape ops: view/reshape/flatten/unflatten/squeeze/unsqueeze, permute/transpose, expand.

A reshape keeps channels prunable when the channel dim lands whole inside one output dim, merged
with neighbours (flatten before a Linear: `ids` repeat H*W times). Removing channels then removes
whole runs of that output dim and keeps the order, so the rewrite only changes the size literal
of that dim.

A reshape that splits the channel dim exactly over several output dims (C -> (g, w), or
(g1, g2, w): channel shuffle, split attention's radix) gives the channels a structure: g blocks of
width w. The blocks are pruned with the same kept positions: position b of every block is coupled
into one unit, so the last split dim (w) carries the channels and the leading dims (g) keep their
size, like a batch dim. Whatever follows — transposes of those dims, a softmax or sum over the
group axis, merging back to C (the shuffled order b * g + a) — is then an ordinary per-channel op,
and the kept positions map exactly. The rewrite writes the split dims' sizes as literals (g
unchanged, w the kept count), whatever code computed them (`num_channels // groups`). A split
that also merges part of the channel dim with a neighbour stays a boundary.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..context import Layout
from ..shapes import VALUE, TensorSpec
from .registry import (
    OpHandler,
    get_arg,
    register_function,
    register_method,
    register_module,
    set_arg,
)


def merged_position(in_shape, out_shape, c: int):
    """(output dim, lead factor, trail factor) if input dim `c` lands whole in one output dim."""
    before, through = math.prod(in_shape[:c]), math.prod(in_shape[:c + 1])
    for j in range(len(out_shape)):
        lo, hi = math.prod(out_shape[:j]), math.prod(out_shape[:j + 1])
        if lo <= before and hi >= through and before % lo == 0 and hi % through == 0:
            return j, before // lo, hi // through
    return None


# Set on a reshape that splits the channel dim: (first, last) output dims it is split over.
SPLIT = "fxprune_channel_split"


def split_position(in_shape, out_shape, c: int):
    """(first, last) output dims that input dim `c` is split over exactly — their product is its
    size, no neighbour merged in — with the last of size > 1; None if there are no such dims."""
    before, through = math.prod(in_shape[:c]), math.prod(in_shape[:c + 1])
    starts = [j for j in range(len(out_shape) + 1) if math.prod(out_shape[:j]) == before]
    ends = [j for j in range(len(out_shape)) if math.prod(out_shape[:j + 1]) == through]
    if not starts or not ends or in_shape[c] < 2:
        return None
    first, last = max(starts), min(ends)
    while last > first and out_shape[last] == 1:
        last -= 1
    return (first, last) if first < last else None


def reshape_layout(ctx, node, x) -> Layout | None:
    node.meta.pop(SPLIT, None)
    lay = ctx.layout(x)
    if not isinstance(lay, Layout):
        return None
    in_shape, out_shape = ctx.spec(x).shape, ctx.spec(node).shape
    found = merged_position(in_shape, out_shape, lay.dim)
    if found is not None:
        j, lead, trail = found
        return Layout(j, np.tile(np.repeat(lay.ids, trail), lead))
    split = split_position(in_shape, out_shape, lay.dim)
    if split is None:
        ctx.boundary(node, "reshape splits the channel dim and merges part of it with another dim")
        return None
    first, last = split
    blocks = lay.ids.reshape(-1, out_shape[last])  # one row per block (index over the leading split dims)
    if len(blocks) > 1:  # the same kept positions in every block
        ctx.couple(np.tile(blocks[0], len(blocks) - 1), blocks[1:].reshape(-1))
    node.meta[SPLIT] = split
    return Layout(last, blocks[0])


def fix_split_sizes(rctx, node, sizes: list, offset: int = 0) -> list:
    """`sizes` (one entry per output dim from `offset` on) with the split dims written as literals:
    the leading (group) dims unchanged, the channel dim its kept count."""
    first, last = rctx.original_meta(node)[SPLIT]
    out_shape = rctx.spec(node).shape
    sizes = list(sizes)
    for j in range(first, last):
        sizes[j - offset] = int(out_shape[j])
    sizes[last - offset] = rctx.kept_count(rctx.layout(node).ids)
    return sizes


def _reads_channel_count(ctx, entry, depth: int = 0) -> bool:
    """`entry` (a shape argument) is computed at run time from the channel dim's size of a tensor
    that carries channels: `c // 2` where `n, c, h, w = x.size()`."""
    if not isinstance(entry, fx.Node) or depth > 16:
        return False
    if entry.op == "call_function" and entry.target is operator.getitem:
        source, index = entry.args
        if isinstance(source, fx.Node) and isinstance(index, int) and _is_size_tuple(source):
            tensor = source.args[0]
            lay, ndim = ctx.layout(tensor), ctx.spec(tensor).ndim
            return isinstance(lay, Layout) and index % ndim == lay.dim
    if entry.op == "call_method" and entry.target == "size" and len(entry.args) > 1:
        lay, ndim = ctx.layout(entry.args[0]), ctx.spec(entry.args[0]).ndim
        return isinstance(lay, Layout) and isinstance(entry.args[1], int) and entry.args[1] % ndim == lay.dim
    if entry.op == "call_function" and _target_in(entry.target, _SIZE_ARITHMETIC):
        return any(_reads_channel_count(ctx, a, depth + 1) for a in entry.args)
    return False


def _is_size_tuple(node: fx.Node) -> bool:
    """`x.size()` or `x.shape`."""
    return ((node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs)
            or (node.op == "call_function" and node.target is getattr and node.args[1] == "shape"))


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

    def _shape(self, node):
        shape, packed = self._shape_args(node)
        if "shape" in node.kwargs or not shape:
            shape, packed = list(node.kwargs.get("shape", ())), None
        return shape, packed

    def analyze(self, ctx, node):
        lay = reshape_layout(ctx, node, node.args[0])
        shape = self._shape(node)[0]
        if SPLIT in node.meta and len(shape) != ctx.spec(node).ndim:
            node.meta.pop(SPLIT)
            ctx.boundary(node, "reshape splits the channel dim with a shape given as one value")
            return None
        if isinstance(lay, Layout) and SPLIT not in node.meta and any(
                j != lay.dim and _reads_channel_count(ctx, entry) for j, entry in enumerate(shape)):
            # `view(n, 2, c // 2, h, w)` with blocks of one channel lands C whole in the group dim;
            # the slim `c // 2` would then follow the kept count into the wrong dim
            ctx.boundary(node, "reshape computes a dim other than the channel dim from the channel count")
            return None
        return lay

    def rewrite(self, rctx, node):
        lay = rctx.layout(node)
        if lay is None:
            return
        shape, packed = self._shape(node)
        if SPLIT in rctx.original_meta(node):
            shape = fix_split_sizes(rctx, node, shape)
        else:
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


@register_method("view_as", "reshape_as")
class ViewAs(OpHandler):
    """x.view_as(other) / x.reshape_as(other): the sizes come from `other`, which must carry the same
    channels on the same dim (coupled), so that it shrinks with them."""

    def analyze(self, ctx, node):
        lay = reshape_layout(ctx, node, node.args[0])
        if lay is None:
            return None
        other = ctx.layout(node.args[1])
        if SPLIT in node.meta or not (isinstance(other, Layout) and other.dim == lay.dim
                                      and len(other.ids) == len(lay.ids)):
            node.meta.pop(SPLIT, None)
            ctx.boundary(node, f".{node.target}() a tensor whose channels are not the same")
            return None
        ctx.couple(lay.ids, other.ids)
        return lay


@register_method("flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_")
@register_function(torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten)
@register_module(nn.Flatten, nn.Unflatten)
class MergeOrSplitDims(OpHandler):
    """Shape ops without size literals on the channel dim (sizes come from the tensor), except
    `unflatten`, whose sizes the rewrite fixes where it splits the channel dim."""

    def analyze(self, ctx, node):
        return reshape_layout(ctx, node, node.args[0])

    def rewrite(self, rctx, node):
        if rctx.layout(node) is None or SPLIT not in rctx.original_meta(node):
            return
        ndim_in = len(rctx.spec(node.args[0]).shape)
        if node.op == "call_module":
            mod = rctx.get_submodule(node.target)
            mod.unflattened_size = tuple(fix_split_sizes(rctx, node, mod.unflattened_size, mod.dim % ndim_in))
            return
        dim, sizes = get_arg(node, 1, "dim"), get_arg(node, 2, "sizes")
        set_arg(node, 2, "sizes", tuple(fix_split_sizes(rctx, node, sizes, dim % ndim_in)))


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


@register_method("repeat_interleave")
@register_function(torch.repeat_interleave)
class RepeatInterleave(Expand):
    """x.repeat_interleave(repeats, dim): copies along another dim keep channels (MViT v1's
    separable positional embedding repeats its temporal table over positions); without a dim
    the tensor is flattened first."""

    def analyze(self, ctx, node):
        if not isinstance(ctx.layout(get_arg(node, 0, "input")), Layout):
            return None
        if get_arg(node, 2, "dim") is None:
            ctx.boundary(node, "repeat_interleave without a dim flattens the channels")
            return None
        return super().analyze(ctx, node)


_SHAPE_OPS = {"view", "reshape", "expand", "flatten", "unflatten", torch.reshape}
# Reads of a whole size tuple that do not depend on any size (`len(x.shape)` is the rank).
_RANK_READS = {len}

# Set on a size read of a parameter/buffer (`self.scale.shape[0]` in arithmetic): (target, dims
# whose size reaches computation). The analysis marks those dims' members once all are known.
PARAM_SIZE_READ = "fxprune_param_size_read"


def _target_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:  # an unhashable callable
        return False


def _shapes_of(user: fx.Node, value: fx.Node) -> bool:
    """`value` is a shape argument of the shape op `user` (not the tensor it reshapes)."""
    return _target_in(user.target, _SHAPE_OPS) and value is not (user.args[0] if user.args else None)


# Integer arithmetic on sizes (`num_channels // groups`): followed to where its result goes.
_SIZE_ARITHMETIC = {operator.floordiv, operator.mul, operator.add, operator.sub}


def _only_shapes(node: fx.Node) -> bool:
    """The value only feeds shape arguments, which follow the slim tensor at run time (directly or
    through integer arithmetic: `x.view(n, 2, c // 2, h, w)`, whose split dims the rewrite writes
    as literals anyway)."""
    return all(_shapes_of(user, node) or (user.op == "call_function" and _target_in(user.target, _SIZE_ARITHMETIC)
                                          and not isinstance(user.meta.get(VALUE), TensorSpec)
                                          and _only_shapes(user))
               for user in node.users)


def escaping_dims(size_node: fx.Node, dims: list[int]) -> set[int]:
    """Tensor dims whose size, read through the size tuple `size_node` (`x.shape`, `x.size()`;
    entry i is the size of dim ``dims[i]``), reaches anything but a shape argument.

    Follows indexing (`x.shape[1]`, `x.shape[-3]`), unpacking (`n, c, h, w = x.shape`: one getitem
    per name) and slices (`x.shape[1:]`) through to their users; any other use of a tuple that
    holds a size (`x.new_zeros(x.shape)`, `math.prod(x.shape)`) counts for all of its dims.
    """
    out: set[int] = set()
    n = len(dims)
    for user in size_node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is size_node:
            index = user.args[1]
            if isinstance(index, int) and -n <= index < n:
                if not _only_shapes(user):
                    out.add(dims[index])
                continue
            if isinstance(index, slice) and all(v is None or isinstance(v, int)
                                                 for v in (index.start, index.stop, index.step)):
                out |= escaping_dims(user, dims[index])
                continue
            out |= set(dims)  # an index computed at run time may pick any entry
        elif _target_in(user.target, _RANK_READS):
            continue
        elif not _shapes_of(user, size_node):
            out |= set(dims)
    return out


def _read_dims(node: fx.Node, ndim: int) -> set[int] | None:
    """Dims of the source tensor whose size this read lets reach computation (None: not a size read)."""
    everything = set(range(ndim))
    if node.target is getattr:
        return escaping_dims(node, list(range(ndim))) if node.args[1] == "shape" else None
    if node.target in ("dim", "ndimension"):
        return None
    if node.target in ("numel", "nelement", torch.numel):
        return set() if _only_shapes(node) else everything  # the product of every size
    if node.target is len:  # the size of dim 0
        return set() if ndim == 0 or _only_shapes(node) else {0}
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")  # x.size(d) / x.size()
    if dim is None:
        return escaping_dims(node, list(range(ndim)))
    if _only_shapes(node):
        return set()
    return {dim % ndim} if isinstance(dim, int) and ndim else everything


def field_names(spec) -> tuple | None:
    """Field names of a namedtuple or `torch.return_types` value (their `.values`, `.indices`)."""
    if not isinstance(spec, tuple):
        return None
    names = getattr(spec, "_fields", None) or getattr(type(spec), "__match_args__", None)
    return tuple(names) if names else None


@register_method("size", "dim", "numel", "ndimension", "nelement")
@register_function(getattr, torch.numel, len)
class SizeRead(OpHandler):
    """Reading sizes is harmless unless code computes with the channel count (`x / x.size(1)`,
    `x / x.shape[1]`, `c = x.shape[-3]`, `x.numel()`, `len(x)` where dim 0 holds channels): then
    that group's channels stay (a boundary), since pruning would change the value computed."""

    def analyze(self, ctx, node):
        node.meta.pop(PARAM_SIZE_READ, None)
        x = get_arg(node, 0, "input")
        lay = ctx.layout(x)
        spec = ctx.spec(x)
        if node.target is getattr and isinstance(lay, (tuple, list)):
            names = field_names(spec)
            attr = node.args[1]
            return lay[names.index(attr)] if names and attr in names else None  # a named field
        if node.target is getattr and node.args[1] != "shape":
            if isinstance(lay, Layout) and ctx.is_tensor(node):
                ctx.boundary(node, f"tensor attribute .{node.args[1]}")
            return None  # .dtype, .device, .ndim, ...
        if not ctx.is_tensor(x):
            return None
        dims = _read_dims(node, spec.ndim)
        if not dims:
            return None
        if isinstance(x, fx.Node) and x.op == "get_attr":
            node.meta[PARAM_SIZE_READ] = (x.target, sorted(dims))
        elif isinstance(lay, Layout) and lay.dim in dims:
            what = "the element count" if node.target in ("numel", "nelement", torch.numel) else "the channel count"
            ctx.boundary(node, f"code computes with {what} of {x.name} (dim {lay.dim}), which pruning would change")
        return None
