"""Reductions over some dims (`x.mean((2, 3))`, `torch.sum(x, 1)`, `x.max(1).values`): per channel
unless the channel dim is reduced, in which case every channel reaches the result and all of them
stay.

Ops along one dim that keep it (`sort`, `topk`, `argsort`, `cummax`): per channel along another
dim; along the channel dim the result depends on every channel and on their order, so they are
a boundary.

Several of these return a `torch.return_types` tuple (`values`, `indices`), or a plain tuple
(`std_mean`): its layout is one Layout per field, read by `getitem` / `.values` (see
`reshape.SizeRead`). `torch.max(a, b)` / `torch.min(a, b)` with a tensor `b` are elementwise.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..context import Layout
from .elementwise import Elementwise
from .registry import OpHandler, get_arg, register_function, register_method

_REDUCTIONS = ("mean", "sum", "amax", "amin", "nansum", "nanmean", "std", "var", "logsumexp",
               "prod", "norm")


def _dims(dim, ndim: int):
    if dim is None:
        return None
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return "computed"
    return sorted(d % max(ndim, 1) for d in dims)


def _tensor_specs(ctx, node) -> list | None:
    """The output's TensorSpecs (one per field of a tuple result), or None if any is not a tensor."""
    spec = ctx.spec(node)
    specs = list(spec) if isinstance(spec, tuple) else [spec]
    return specs if specs and all(hasattr(s, "shape") for s in specs) else None


def _pack(ctx, node, layout: Layout):
    return tuple(layout for _ in ctx.spec(node)) if isinstance(ctx.spec(node), tuple) else layout


def reduce_layout(ctx, node, x, dim) -> Layout | tuple | None:
    """Layout of the result of reducing `x` over `dim` (None: all dims; an int or a sequence).

    Reducing the channel dim marks the channels; otherwise they move to where the remaining dims
    put them (whether the dims were kept is read from the result's rank, not from arguments).
    """
    lay = ctx.layout(x)
    if not isinstance(lay, Layout):
        return None
    specs = _tensor_specs(ctx, node)
    if specs is None:
        ctx.boundary(node, "reduction with a non-tensor result")
        return None
    ndim = ctx.spec(x).ndim
    dims = _dims(dim, ndim)
    if dims is None or dims == "computed" or lay.dim in dims:
        ctx.mark(lay.ids, f"{node.name}: reduces over the channel dim")
        return None
    out_ndim = specs[0].ndim
    new_dim = lay.dim if out_ndim == ndim else lay.dim - sum(d < lay.dim for d in dims)
    if any(s.ndim != out_ndim or not 0 <= new_dim < s.ndim or s.shape[new_dim] != len(lay.ids) for s in specs):
        ctx.boundary(node, "unexpected reduction result shape")
        return None
    return _pack(ctx, node, Layout(new_dim, lay.ids))


def along_layout(ctx, node, x, dim, what: str) -> Layout | tuple | None:
    """Layout of an op that works along `dim` and keeps every other dim (sort, topk, cummax)."""
    lay = ctx.layout(x)
    if not isinstance(lay, Layout):
        return None
    specs = _tensor_specs(ctx, node)
    ndim = ctx.spec(x).ndim
    if not isinstance(dim, int) or specs is None:
        ctx.boundary(node, f"{what} along a computed dim")
        return None
    if dim % max(ndim, 1) == lay.dim:
        ctx.boundary(node, f"{what} along the channel dim (the result depends on every channel and their order)")
        return None
    if any(s.ndim != ndim or s.shape[lay.dim] != len(lay.ids) for s in specs):
        ctx.boundary(node, "output does not keep the input's channel dim")
        return None
    return _pack(ctx, node, lay)


@register_function(*(getattr(torch, n) for n in _REDUCTIONS))
@register_method(*_REDUCTIONS)
class Reduction(OpHandler):
    def analyze(self, ctx, node):
        dim_index = 2 if node.target in ("norm", torch.norm) else 1
        return reduce_layout(ctx, node, get_arg(node, 0, "input"), get_arg(node, dim_index, "dim"))


# Reductions returning values and indices (or two statistics): {name: (position of dim, default)}.
_INDEXED_REDUCTIONS = {"median": (1, None), "nanmedian": (1, None), "mode": (1, -1), "kthvalue": (2, -1),
                       "argmax": (1, None), "argmin": (1, None), "std_mean": (1, None), "var_mean": (1, None)}


@register_function(*(getattr(torch, n) for n in _INDEXED_REDUCTIONS))
@register_method(*(n for n in _INDEXED_REDUCTIONS if hasattr(torch.Tensor, n)))
class IndexedReduction(OpHandler):
    """`x.median(1)`, `torch.kthvalue(x, k, dim)`, `x.argmax(1)`, `torch.std_mean(x, dim)`."""

    def analyze(self, ctx, node):
        name = node.target if isinstance(node.target, str) else node.target.__name__
        index, default = _INDEXED_REDUCTIONS[name]
        return reduce_layout(ctx, node, get_arg(node, 0, "input"), get_arg(node, index, "dim", default))


@register_function(torch.aminmax)
@register_method("aminmax")
class AMinMax(OpHandler):
    def analyze(self, ctx, node):
        return reduce_layout(ctx, node, get_arg(node, 0, "input"), node.kwargs.get("dim"))


def _other_tensor(ctx, node) -> bool:
    other = get_arg(node, 1, "other")
    return isinstance(other, fx.Node) and ctx.is_tensor(other)


@register_function(torch.max, torch.min)
@register_method("max", "min")
class MaxMin(OpHandler):
    """`x.max()` (all), `x.max(dim)` (values, indices) or `torch.max(a, b)` (elementwise)."""

    def analyze(self, ctx, node):
        if _other_tensor(ctx, node):
            return Elementwise().analyze(ctx, node)
        return reduce_layout(ctx, node, get_arg(node, 0, "input"), get_arg(node, 1, "dim"))


# Ops along one dim that keep it: {name: (position of dim, default)}.
_ALONG = {"sort": (1, -1), "argsort": (1, -1), "topk": (2, -1), "cummax": (1, None), "cummin": (1, None),
          "msort": (None, 0)}


@register_function(*(getattr(torch, n) for n in _ALONG))
@register_method(*(n for n in _ALONG if hasattr(torch.Tensor, n)))
class AlongDim(OpHandler):
    """`torch.sort(x, 1)`, `x.topk(k, dim)`, `x.argsort(dim)`, `torch.cummax(x, dim)`."""

    def analyze(self, ctx, node):
        name = node.target if isinstance(node.target, str) else node.target.__name__
        index, default = _ALONG[name]
        dim = default if index is None else get_arg(node, index, "dim", default)
        return along_layout(ctx, node, get_arg(node, 0, "input"), dim, name)
