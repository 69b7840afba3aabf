"""Reductions over some dims (`x.mean((2, 3))`, `torch.sum(x, 1)`): per channel unless the channel
dim is reduced, in which case every channel reaches the result and all of them stay.
"""
from __future__ import annotations

import torch

from ..context import Layout
from .registry import OpHandler, get_arg, register_function, register_method

_REDUCTIONS = ("mean", "sum", "amax", "amin", "nansum", "nanmean", "std", "var", "logsumexp",
               "prod", "norm")


def _dims(dim, ndim: int):
    if dim is None:
        return None
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return "computed"
    return sorted(d % ndim for d in dims)


@register_function(*(getattr(torch, n) for n in _REDUCTIONS))
@register_method(*_REDUCTIONS)
class Reduction(OpHandler):
    def analyze(self, ctx, node):
        x = node.args[0]
        lay = ctx.layout(x)
        if not isinstance(lay, Layout) or not ctx.is_tensor(node):
            if isinstance(lay, Layout):
                ctx.boundary(node, "reduction with a non-tensor result")
            return None
        ndim = ctx.spec(x).ndim
        dim_index = 2 if node.target in ("norm", torch.norm) else 1
        dims = _dims(get_arg(node, dim_index, "dim"), ndim)
        if dims is None or dims == "computed" or lay.dim in dims:
            ctx.mark(lay.ids, f"{node.name}: reduces over the channel dim")
            return None
        keepdim = get_arg(node, dim_index + 1, "keepdim", False)
        new_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
        if ctx.spec(node).shape[new_dim] != len(lay.ids):
            ctx.boundary(node, "unexpected reduction result shape")
            return None
        return Layout(new_dim, lay.ids)
