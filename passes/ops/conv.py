"""Convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d and their functional forms).

Channels: output rows are new elements; input columns read the input layout. A grouped or
depthwise conv can only lose whole groups (the kept groups stay equal), so every element of one
group — its input channels and its output channels — is coupled into one unit.
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import nn

from ..context import Layout
from ..tensors import get_tensor, present, read_tensor
from .registry import (
    OpHandler,
    get_arg,
    get_attr_target,
    register_function,
    register_module,
    set_arg,
)


def _couple_groups(ctx, in_ids: np.ndarray, out_ids: np.ndarray, groups: int) -> None:
    """Each group's input and output elements form one unit: all coupled to the group's first
    element, for all groups in one call (a depthwise conv has as many groups as channels)."""
    rows = np.concatenate([in_ids.reshape(groups, -1), out_ids.reshape(groups, -1)], axis=1)
    if rows.shape[1] > 1:
        ctx.couple(np.repeat(rows[:, 0], rows.shape[1] - 1), rows[:, 1:].reshape(-1))


def analyze_conv(ctx, node, x, weight, bias, groups: int, spatial: int, transposed: bool):
    """Shared by module and functional forms. `weight`/`bias` are parameter names (or None)."""
    spec = ctx.spec(x)
    dim = spec.ndim - spatial - 1
    in_ids = ctx.ids_on(x, dim, node)
    out_channels = ctx.spec(node).shape[dim]
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if groups == 1:
        ctx.member(weight, in_dim, in_ids, "in", node)
        out_ids = ctx.member(weight, out_dim, None, "out", node, size=out_channels)
    else:
        if transposed:
            out_ids = ctx.new_ids(out_channels) if bias is None else ctx.member(
                bias, 0, None, "channel", node, size=out_channels)
            ctx.member(weight, 0, in_ids, "in", node)
        else:
            out_ids = ctx.member(weight, 0, None, "out", node, size=out_channels)
        _couple_groups(ctx, in_ids, out_ids, groups)
    if bias is not None:
        ctx.member(bias, 0, out_ids, "channel", node)
    return Layout(dim, out_ids)


def conv_sizes_after(weight_shape, groups: int, old_in: int, old_out: int, transposed: bool):
    """(in_channels, out_channels, groups) of a conv whose weight was sliced to `weight_shape`."""
    if transposed:
        new_in = weight_shape[0]
        new_groups = groups if groups == 1 else new_in // (old_in // groups)
        return new_in, weight_shape[1] * new_groups, new_groups
    new_out = weight_shape[0]
    new_groups = groups if groups == 1 else new_out // (old_out // groups)
    return weight_shape[1] * new_groups, new_out, new_groups


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)
class ConvModule(OpHandler):
    def analyze(self, ctx, node):
        conv = ctx.get_submodule(node.target)
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        bias = f"{node.target}.bias" if present(conv, "bias") else None
        return analyze_conv(ctx, node, node.args[0], f"{node.target}.weight", bias, conv.groups,
                            len(conv.kernel_size), transposed)

    def rewrite(self, rctx, node):
        conv = rctx.get_submodule(node.target)
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        old = [rctx.original_module_attr(node.target, a) for a in ("groups", "in_channels", "out_channels")]
        conv.in_channels, conv.out_channels, conv.groups = conv_sizes_after(
            read_tensor(conv, "weight").shape, *old, transposed)


_FUNCTIONAL = {F.conv1d: (1, False), F.conv2d: (2, False), F.conv3d: (3, False),
               F.conv_transpose1d: (1, True), F.conv_transpose2d: (2, True),
               F.conv_transpose3d: (3, True)}


@register_function(*_FUNCTIONAL)
class ConvFunction(OpHandler):
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) on get_attr parameters."""

    @staticmethod
    def _groups_index(node) -> int:
        return 7 if _FUNCTIONAL[node.target][1] else 6  # transposed convs take output_padding

    def analyze(self, ctx, node):
        spatial, transposed = _FUNCTIONAL[node.target]
        weight = get_attr_target(get_arg(node, 1, "weight"))
        bias_arg = get_arg(node, 2, "bias")
        bias = get_attr_target(bias_arg)
        groups = get_arg(node, self._groups_index(node), "groups", 1)
        if weight is None or (bias_arg is not None and bias is None) or not isinstance(groups, int):
            ctx.boundary(node, "functional conv whose weight/bias/groups are computed, not parameters")
            return None
        return analyze_conv(ctx, node, node.args[0], weight, bias, groups, spatial, transposed)

    def rewrite(self, rctx, node):
        groups = get_arg(node, self._groups_index(node), "groups", 1)
        if groups == 1:
            return
        target = get_attr_target(get_arg(node, 1, "weight"))
        weight = get_tensor(rctx.gm, target)  # a parameter, a buffer (a fixed blur filter) or a plain tensor
        old_w = rctx.original_shape(target)
        per_group = old_w[0] // groups  # rows per group: out (conv) or in (transposed)
        set_arg(node, self._groups_index(node), "groups", weight.shape[0] // per_group)
