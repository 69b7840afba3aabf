"""Normalisations. BatchNorm/InstanceNorm are per channel; GroupNorm can lose whole groups only
(its statistics are per group); LayerNorm over the channel dim mixes every channel's statistics,
so by default (``layernorm="boundary"``) those channels stay (pruning one would change every other
channel's output).

``layernorm="prune"`` (opt-in, the `layernorm` option of `compress`/`with_grouped`): a LayerNorm
(nn.LayerNorm, F.layer_norm, and so the permute / F.layer_norm / permute of a channels-first
LayerNorm2d) whose normalized_shape is the channel dim alone (the last dim) joins the channel
group of its input, as Torch-Pruning does: the rewrite slices its weight, bias and
normalized_shape. **This is not function-preserving** for removed channels with nonzero values:
the slim LayerNorm computes its mean and variance over the kept channels only. The masked
reference therefore does the same (`reference`: a `MaskedLayerNorm` normalising over the kept
positions and writing zeros elsewhere), so the verification checks that the slim model equals
"the original with its LayerNorms over the kept channels", not the original. A LayerNorm over
several dims that include the channel dim stays a boundary.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import Layout
from ..shapes import VALUE
from ..tensors import get_tensor, present, read_tensor
from .registry import (
    OpHandler,
    get_arg,
    get_attr_target,
    register_function,
    register_module,
    set_arg,
)

_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

LAYERNORM_MODES = ("boundary", "prune")


def _per_channel(ctx, node, x, targets: list[str]) -> Layout:
    ids = ctx.ids_on(x, 1, node)
    for t in targets:
        ctx.member(t, 0, ids, "channel", node)
    return Layout(1, ids)


@register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class PerChannelNormModule(OpHandler):
    def analyze(self, ctx, node):
        mod = ctx.get_submodule(node.target)
        if ctx.spec(node.args[0]).ndim < 2:
            ctx.boundary(node, "unbatched input to a batch/instance norm")
            return None
        names = [f"{node.target}.{a}" for a in _BN_BUFFERS if present(mod, a)]
        return _per_channel(ctx, node, node.args[0], names)

    def rewrite(self, rctx, node):
        mod = rctx.get_submodule(node.target)
        for a in _BN_BUFFERS:
            if present(mod, a):
                mod.num_features = read_tensor(mod, a).shape[0]
                return


@register_function(F.batch_norm, F.instance_norm)
class PerChannelNormFunction(OpHandler):
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...) / F.instance_norm(x, rm, rv, w, b)."""

    def analyze(self, ctx, node):
        args = [get_arg(node, i, n) for i, n in
                ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        targets = [get_attr_target(a) for a in args]
        if any(a is not None and t is None for a, t in zip(args, targets)):
            ctx.boundary(node, "functional norm whose statistics/affine are computed tensors")
            return None
        return _per_channel(ctx, node, node.args[0], [t for t in targets if t is not None])


def _group_norm(ctx, node, x, num_groups: int, targets: list[str]) -> Layout:
    ids = ctx.ids_on(x, 1, node)
    rows = ids.reshape(num_groups, -1)  # one unit per group, all groups coupled in one call
    if rows.shape[1] > 1:
        ctx.couple(np.repeat(rows[:, 0], rows.shape[1] - 1), rows[:, 1:].reshape(-1))
    for t in targets:
        ctx.member(t, 0, ids, "channel", node)
    return Layout(1, ids)


@register_module(nn.GroupNorm)
class GroupNormModule(OpHandler):
    def analyze(self, ctx, node):
        gn = ctx.get_submodule(node.target)
        names = [f"{node.target}.{a}" for a in ("weight", "bias") if present(gn, a)]
        return _group_norm(ctx, node, node.args[0], gn.num_groups, names)

    def rewrite(self, rctx, node):
        gn = rctx.get_submodule(node.target)
        ids = rctx.layout(node).ids
        per = len(ids) // rctx.original_module_attr(node.target, "num_groups")
        gn.num_channels = rctx.kept_count(ids)
        gn.num_groups = gn.num_channels // per


@register_function(F.group_norm)
class GroupNormFunction(OpHandler):
    def analyze(self, ctx, node):
        num_groups = get_arg(node, 1, "num_groups")
        args = [get_arg(node, 2, "weight"), get_arg(node, 3, "bias")]
        targets = [get_attr_target(a) for a in args]
        if not isinstance(num_groups, int) or any(a is not None and t is None for a, t in zip(args, targets)):
            ctx.boundary(node, "F.group_norm with computed groups/affine")
            return None
        return _group_norm(ctx, node, node.args[0], num_groups, [t for t in targets if t])

    def rewrite(self, rctx, node):
        ids = rctx.layout(node).ids
        per = len(ids) // get_arg(node, 1, "num_groups")
        set_arg(node, 1, "num_groups", rctx.kept_count(ids) // per)


def _layer_norm(ctx, node, x, n_norm_dims: int, targets: list[str]):
    lay = ctx.layout(x)
    spec = ctx.spec(x)
    if not isinstance(lay, Layout):
        return None
    first_normalised = spec.ndim - n_norm_dims
    if lay.dim < first_normalised:
        return lay  # normalises trailing non-channel dims only: per channel, passes through
    if getattr(ctx, "layernorm", "boundary") == "prune" and n_norm_dims == 1:
        for t in targets:  # statistics over the kept channels (module docstring): not function-preserving
            ctx.member(t, 0, lay.ids, "channel", node)
        return lay
    why = ("LayerNorm normalises over the channel dim (statistics mix channels)" if n_norm_dims == 1 else
           "LayerNorm normalises over several dims including the channel dim (statistics mix channels)")
    ctx.mark(lay.ids, f"{node.name}: {why}")
    for t in targets:
        ctx.member(t, lay.dim - first_normalised, lay.ids, "channel", node)
    return lay


class MaskedLayerNorm(nn.Module):
    """The masked reference's LayerNorm over the last dim with only the positions `kept` (a long
    tensor) left: mean and variance over those positions, the kept weight and bias, zeros at the
    removed positions (which every later reader ignores). The slim LayerNorm computes exactly this
    on its kept channels."""

    def __init__(self, kept: torch.Tensor, eps: float, weight: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("kept", kept)
        self.eps = eps
        self.register_buffer("weight", None if weight is None else weight.detach().index_select(0, kept))
        self.register_buffer("bias", None if bias is None else bias.detach().index_select(0, kept))

    def forward(self, x):
        y = F.layer_norm(x.index_select(-1, self.kept), (len(self.kept),), self.weight, self.bias, self.eps)
        return torch.zeros_like(x).index_copy(-1, self.kept, y.to(x.dtype))


def _masked_layer_norm(channels, ref, node, keep_root, n_norm_dims: int, eps: float, weight, bias) -> None:
    """Replace the LayerNorm at `node` of the masked reference `ref` by a `MaskedLayerNorm` where its
    channel dim (the last, alone normalised) lost positions."""
    lay = channels.layouts.get(node.name)
    x = node.args[0]
    ndim = getattr(x.meta.get(VALUE) if isinstance(x, fx.Node) else None, "ndim", None)
    if not isinstance(lay, Layout) or n_norm_dims != 1 or ndim is None or lay.dim != ndim - 1:
        return
    kept = keep_root[channels.root[lay.ids]]
    if kept.all():
        return
    index = torch.as_tensor(np.nonzero(kept)[0], dtype=torch.long)
    if weight is not None:
        index = index.to(weight.device)
    name = f"fxprune_masked_{node.name}"
    ref.add_submodule(name, MaskedLayerNorm(index, eps, weight, bias))
    with ref.graph.inserting_before(node):
        masked = ref.graph.call_module(name, (x,))
    node.replace_all_uses_with(masked)
    ref.graph.erase_node(node)


@register_module(nn.LayerNorm)
class LayerNormModule(OpHandler):
    def analyze(self, ctx, node):
        ln = ctx.get_submodule(node.target)
        names = [f"{node.target}.{a}" for a in ("weight", "bias") if present(ln, a)]
        return _layer_norm(ctx, node, node.args[0], len(ln.normalized_shape), names)

    def rewrite(self, rctx, node):
        ln = rctx.get_submodule(node.target)
        lay = rctx.layout(node)
        if len(ln.normalized_shape) == 1 and isinstance(lay, Layout) and lay.dim == len(rctx.spec(node).shape) - 1:
            ln.normalized_shape = (rctx.kept_count(lay.ids),)

    def reference(self, channels, ref, node, keep_root):
        ln = ref.get_submodule(node.target)
        _masked_layer_norm(channels, ref, node, keep_root, len(ln.normalized_shape), ln.eps,
                           ln.weight if present(ln, "weight") else None, ln.bias if present(ln, "bias") else None)


@register_function(F.layer_norm)
class LayerNormFunction(OpHandler):
    def analyze(self, ctx, node):
        shape = get_arg(node, 1, "normalized_shape")
        args = [get_arg(node, 2, "weight"), get_arg(node, 3, "bias")]
        targets = [get_attr_target(a) for a in args]
        if not isinstance(shape, (list, tuple)) or any(a is not None and t is None for a, t in zip(args, targets)):
            ctx.boundary(node, "F.layer_norm with a computed shape/affine")
            return None
        return _layer_norm(ctx, node, node.args[0], len(shape), [t for t in targets if t])

    def rewrite(self, rctx, node):
        shape = get_arg(node, 1, "normalized_shape")
        lay = rctx.layout(node)
        if (isinstance(shape, (list, tuple)) and len(shape) == 1 and isinstance(lay, Layout)
                and lay.dim == len(rctx.spec(node).shape) - 1):
            set_arg(node, 1, "normalized_shape", type(shape)([rctx.kept_count(lay.ids)]))

    def reference(self, channels, ref, node, keep_root):
        shape = get_arg(node, 1, "normalized_shape")
        if not isinstance(shape, (list, tuple)):
            return
        weight, bias = (get_attr_target(get_arg(node, i, n)) for i, n in ((2, "weight"), (3, "bias")))
        _masked_layer_norm(channels, ref, node, keep_root, len(shape), get_arg(node, 4, "eps", 1e-5),
                           None if weight is None else get_tensor(ref, weight),
                           None if bias is None else get_tensor(ref, bias))


__all__ = ["LAYERNORM_MODES", "MaskedLayerNorm"]
