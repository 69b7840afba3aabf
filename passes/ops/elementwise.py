"""Elementwise binary ops with broadcasting: add/sub/mul/div and friends.

Operands are aligned from the right. An operand that is full size along the channel dim shares
its channels with the output: a residual add couples both branches, an SE-style `x * s` couples
the gate's producer with `x`. An operand of size 1 there broadcasts and couples nothing. A
parameter operand (a layer scale, a learnt bias) becomes a member sliced with the channels.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..context import Layout
from .registry import OpHandler, register_function, register_method

_BINARY_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul, torch.addcdiv,
    operator.pow, operator.neg, torch.pow, torch.clamp, torch.clip,
    operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne,
)
_BINARY_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum",
                   "minimum", "where", "lerp", "addcmul", "addcdiv", "type_as",
                   "pow", "clamp", "clamp_", "clip")


def _tensor_operands(ctx, node: fx.Node) -> list[fx.Node]:
    operands = [a for a in (*node.args, *node.kwargs.values()) if ctx.is_tensor(a)]
    if node.op == "call_method" and node.target == "type_as":
        operands = operands[:1]  # type_as(other) only reads other's dtype
    return operands


def _channel_dim(ctx, node, operands, out_ndim):
    """(output dim, ids) from the first operand whose layout is full size in the output."""
    out_shape = ctx.spec(node).shape
    for op in operands:
        lay = ctx.layout(op)
        if isinstance(lay, Layout):
            d = lay.dim + out_ndim - ctx.spec(op).ndim
            if ctx.spec(op).shape[lay.dim] == out_shape[d]:
                return d, lay.ids
    return None, None


@register_function(*_BINARY_FUNCTIONS)
@register_method(*_BINARY_METHODS)
class Elementwise(OpHandler):
    def analyze(self, ctx, node):
        if not ctx.is_tensor(node):
            return None  # Python arithmetic on sizes
        operands = _tensor_operands(ctx, node)
        out_ndim = ctx.spec(node).ndim
        d, ids = _channel_dim(ctx, node, operands, out_ndim)
        if d is None:
            return None
        for op in operands:
            spec = ctx.spec(op)
            a = d - (out_ndim - spec.ndim)  # the operand's own dim aligned with the output's d
            if a < 0 or spec.shape[a] == 1:
                continue  # broadcasts along the channels
            lay = ctx.layout(op)
            if isinstance(lay, Layout) and lay.dim == a:
                ctx.couple(ids, lay.ids)
            elif op.op == "get_attr" and op.target not in ctx.tainted:
                ctx.member(op.target, a, ids, "channel", node)
            else:
                if isinstance(lay, Layout):
                    ctx.mark(lay.ids, f"{node.name}: operand {op.name} has channels on another dim")
                ctx.mark(ids, f"{node.name}: operand {op.name} has untracked channels")
        return Layout(d, ids)
