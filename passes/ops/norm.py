"""Normalisations. BatchNorm/InstanceNorm are per channel; GroupNorm can lose whole groups only
(its statistics are per group); LayerNorm over the channel dim mixes every channel's statistics,
so those channels stay (pruning one would change every other channel's output).
"""
from __future__ import annotations

import numpy as np
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
    set_arg,
)

_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


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
    ctx.mark(lay.ids, f"{node.name}: LayerNorm normalises over the channel dim (statistics mix channels)")
    for t in targets:
        ctx.member(t, lay.dim - first_normalised, lay.ids, "channel", node)
    return lay


@register_module(nn.LayerNorm)
class LayerNormModule(OpHandler):
    def analyze(self, ctx, node):
        ln = ctx.get_submodule(node.target)
        names = [f"{node.target}.{a}" for a in ("weight", "bias") if present(ln, a)]
        return _layer_norm(ctx, node, node.args[0], len(ln.normalized_shape), names)


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


