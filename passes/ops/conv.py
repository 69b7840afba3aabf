"""Convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d and their functional forms).

Channels: output rows are new elements; input columns read the input layout. A grouped conv
(`groups` = G > 1) needs every group to keep the same number of input and of output channels. Two
ways to get that, chosen by the analysis' `grouped` option:

* ``"whole"`` (the default): whole groups go. Every element of one group — its input channels and
  its output channels — is coupled into one unit; the slim conv has fewer groups.
* ``"equal"``: every group keeps the same positions (Torch-Pruning's choice for grouped convs). The
  channels at position j of every group — of the input blocks, and separately of the output blocks —
  are coupled into one unit; the slim conv keeps G groups, each narrower. The weight is sliced on
  dim 0 (output rows, any kept positions, the same in every group) and on dim 1 (the per-group input
  positions, the same for every group). Only for convs (not transposed) whose groups have at least
  2 input and 2 output channels; a depthwise conv always loses whole groups.
* ``"auto"``: equal where the groups are wide enough to give at least as many units as whole groups
  would (per-group width >= G), whole elsewhere.

A functional conv whose weight is computed in forward from one parameter of the weight's shape
(weight standardisation: `F.conv2d(x, standardize(self.weight))`, timm's StdConv2d) is followed:
the parameter's get_attr node carries the conv's output channels on dim 0 (`computed_weight_sources`),
the ops computing the weight propagate them like any tensor (a reduction over dims 1.. is per
channel, one over dim 0 or an unknown op marks them), and the conv's output channels stay prunable.
Its input channels stay: the computation may mix them (a standardisation's statistics run over
them), so removing one would change every kept filter.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import Layout
from ..shapes import VALUE
from ..tensors import present, read_tensor
from .registry import (
    OpHandler,
    get_arg,
    get_attr_target,
    register_function,
    register_module,
    set_arg,
)


GROUPED_MODES = ("whole", "equal", "auto")


def grouped_mode(ctx, groups: int, in_per: int, out_per: int, transposed: bool) -> str:
    """'whole' or 'equal' for one grouped conv under the analysis' option (module docstring)."""
    mode = getattr(ctx, "grouped", "whole")
    if groups == 1 or transposed or min(in_per, out_per) < 2 or mode == "whole":
        return "whole"
    if mode == "auto":
        return "equal" if min(in_per, out_per) >= groups else "whole"
    return "equal"


def _couple_positions(ctx, ids: np.ndarray, groups: int) -> None:
    """Position j of every block of `ids` (G blocks) is coupled with position j of the first block."""
    blocks = ids.reshape(groups, -1)
    ctx.couple(np.tile(blocks[0], groups - 1), blocks[1:].reshape(-1))


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
    elif grouped_mode(ctx, groups, len(in_ids) // groups, out_channels // groups, transposed) == "equal":
        out_ids = ctx.member(weight, 0, None, "out", node, size=out_channels)
        _couple_positions(ctx, in_ids, groups)
        _couple_positions(ctx, out_ids, groups)
        ctx.member(weight, 1, in_ids[:len(in_ids) // groups], "in", node)
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


def kept_groups(rctx, node, groups: int) -> int:
    """Groups left after the rewrite: those keeping any output channel (all G where each group kept
    the same positions, fewer where whole groups went)."""
    lay = rctx.layout(node)
    if groups == 1 or not isinstance(lay, Layout):
        return groups
    return int(rctx.kept(lay.ids).reshape(groups, -1).any(axis=1).sum())


def conv_sizes_after(weight_shape, new_groups: int, transposed: bool):
    """(in_channels, out_channels) of a conv whose weight was sliced to `weight_shape`."""
    if transposed:
        return weight_shape[0], weight_shape[1] * new_groups
    return weight_shape[1] * new_groups, weight_shape[0]


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
        conv.groups = kept_groups(rctx, node, rctx.original_module_attr(node.target, "groups"))
        conv.in_channels, conv.out_channels = conv_sizes_after(read_tensor(conv, "weight").shape, conv.groups,
                                                               transposed)


# Set on a conv whose weight is computed: the parameter it is computed from (the cost model scales
# the conv's MACs with that parameter's kept rows). Attention leaves whose MACs all scale with the
# kept heads (MaxViT's, ops/window_attention.py) name their q/k/v weight here too.
WEIGHT_SOURCE = "fxprune_weight_source"


def computed_weight_sources(gm) -> dict[str, str]:
    """{parameter: functional conv node} for each (non-transposed, ungrouped) functional conv whose
    weight is computed from exactly one parameter/buffer of the weight's shape and from nothing
    the model's inputs reach."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or _FUNCTIONAL.get(node.target, (0, True))[1]:
            continue
        weight = get_arg(node, 1, "weight")
        groups = get_arg(node, ConvFunction._groups_index(node), "groups", 1)
        if not isinstance(weight, fx.Node) or weight.op == "get_attr" or groups != 1:
            continue
        shape = getattr(weight.meta.get(VALUE), "shape", None)
        seen, stack, sources, data = set(), [weight], [], False
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                data = True
            elif n.op == "get_attr":
                if getattr(n.meta.get(VALUE), "shape", None) == shape:
                    sources.append(n.target)
            else:
                stack.extend(n.all_input_nodes)
        if not data and len(sources) == 1 and sources[0] not in found:
            found[sources[0]] = node.name
    return found


def analyze_computed_conv(ctx, node, x, weight_node, bias, spatial: int) -> Layout:
    """A conv whose weight `weight_node` carries its output channels on dim 0 (module docstring)."""
    dim = ctx.spec(x).ndim - spatial - 1
    in_ids = ctx.ids_on(x, dim, node)
    source = next(t for t, name in ctx.weight_sources.items() if name == node.name)
    ctx.mark(in_ids, f"{node.name}: its weight is computed from {source}; the input channels stay")
    out_ids = ctx.layout(weight_node).ids
    if bias is not None:
        ctx.member(bias, 0, out_ids, "channel", node)
    node.meta[WEIGHT_SOURCE] = source
    return Layout(dim, out_ids)


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
        node.meta.pop(WEIGHT_SOURCE, None)
        spatial, transposed = _FUNCTIONAL[node.target]
        weight = get_attr_target(get_arg(node, 1, "weight"))
        bias_arg = get_arg(node, 2, "bias")
        bias = get_attr_target(bias_arg)
        groups = get_arg(node, self._groups_index(node), "groups", 1)
        lay = ctx.layout(get_arg(node, 1, "weight"))
        if (weight is None and node.name in ctx.weight_sources.values() and isinstance(lay, Layout)
                and lay.dim == 0 and (bias_arg is None or bias is not None)):
            return analyze_computed_conv(ctx, node, node.args[0], get_arg(node, 1, "weight"), bias, spatial)
        if weight is None or (bias_arg is not None and bias is None) or not isinstance(groups, int):
            ctx.boundary(node, "functional conv whose weight/bias/groups are computed, not parameters")
            return None
        return analyze_conv(ctx, node, node.args[0], weight, bias, groups, spatial, transposed)

    def rewrite(self, rctx, node):
        # the weight is a parameter, a buffer (a fixed blur filter) or a plain tensor: it was sliced
        # like any member; only the group count can change
        groups = get_arg(node, self._groups_index(node), "groups", 1)
        if isinstance(groups, int) and groups > 1:
            set_arg(node, self._groups_index(node), "groups", kept_groups(rctx, node, groups))
