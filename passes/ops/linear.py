"""Linear layers (nn.Linear, F.linear): features live on the last dim.

After a flatten the input ids repeat (one channel -> H*W features), so pruning one channel
removes all of its columns: that is the flatten->linear "spatial expansion factor".
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..context import Layout
from ..tensors import present, read_tensor
from .registry import (
    OpHandler,
    get_arg,
    get_attr_target,
    register_function,
    register_module,
)


def analyze_linear(ctx, node, x, weight: str, bias: str | None) -> Layout:
    dim = ctx.spec(x).ndim - 1
    in_ids = ctx.ids_on(x, dim, node)
    ctx.member(weight, 1, in_ids, "in", node)
    out_ids = ctx.member(weight, 0, None, "out", node, size=ctx.spec(node).shape[-1])
    if bias is not None:
        ctx.member(bias, 0, out_ids, "channel", node)
    return Layout(dim, out_ids)


@register_module(nn.Linear)
class LinearModule(OpHandler):
    def analyze(self, ctx, node):
        lin = ctx.get_submodule(node.target)
        bias = f"{node.target}.bias" if present(lin, "bias") else None
        return analyze_linear(ctx, node, node.args[0], f"{node.target}.weight", bias)

    def rewrite(self, rctx, node):
        lin = rctx.get_submodule(node.target)
        lin.out_features, lin.in_features = read_tensor(lin, "weight").shape


@register_function(F.linear)
class LinearFunction(OpHandler):
    def analyze(self, ctx, node):
        weight = get_attr_target(get_arg(node, 1, "weight"))
        bias_arg = get_arg(node, 2, "bias")
        bias = get_attr_target(bias_arg)
        if weight is None or (bias_arg is not None and bias is None):
            ctx.boundary(node, "F.linear whose weight/bias are computed, not parameters")
            return None
        return analyze_linear(ctx, node, node.args[0], weight, bias)
