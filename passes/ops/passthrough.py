"""Ops that act on each channel on its own: activations, dropout, pooling, resizing, padding,
identity, dtype casts. The output carries the input's layout unchanged. If the output's channel
size differs (a pad that reaches the channel dim), the op is a boundary.

Softmax-like ops and F.normalize mix values along one dim: per channel unless that dim is the
channel dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Layout
from ..tensors import read_tensor
from .registry import (
    OpHandler,
    get_arg,
    register_function,
    register_method,
    register_module,
)

_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.tanhshrink, F.threshold,
    F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear,
    F.pad, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.abs,
    torch.neg, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.square, torch.sign,
    torch.erf, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
    torch.nn.functional.dropout, torch.dropout, torch.clone, torch.detach,
)
_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs",
    "neg", "exp", "log", "sqrt", "rsqrt", "square", "sign", "erf", "contiguous", "clone",
    "detach", "float", "half", "double", "bfloat16", "to", "type", "cpu", "cuda", "requires_grad_",
)


def passthrough_layout(ctx, node, src):
    """`src`'s layout if `node`'s output keeps it (same rank, same channel size); else boundary."""
    lay = ctx.layout(src)
    if not isinstance(lay, Layout):
        return None
    out = ctx.spec(node)
    if (
        hasattr(out, "shape")
        and out.ndim == ctx.spec(src).ndim
        and out.shape[lay.dim] == len(lay.ids)
    ):
        return lay
    ctx.boundary(node, "output does not keep the input's channel dim")
    return None


@register_module(*_MODULES)
@register_function(*_FUNCTIONS)
@register_method(*_METHODS)
class PerChannel(OpHandler):
    def analyze(self, ctx, node):
        return passthrough_layout(ctx, node, node.args[0])


def _stochastic_depth_functions() -> tuple:
    """torchvision's random per-sample / per-channel drops: identity in eval mode, channel by channel
    in training (DropBlock draws its blocks for each channel on its own)."""
    try:
        from torchvision.ops import (
            DropBlock2d,
            DropBlock3d,
            StochasticDepth,
            drop_block2d,
            drop_block3d,
            stochastic_depth,
        )
    except ImportError:  # torchvision is optional
        return (), ()
    return (stochastic_depth, drop_block2d, drop_block3d), (StochasticDepth, DropBlock2d, DropBlock3d)


_SD_FUNCTIONS, _SD_MODULES = _stochastic_depth_functions()
if _SD_FUNCTIONS:
    register_function(*_SD_FUNCTIONS)(PerChannel)
    register_module(*_SD_MODULES)(PerChannel)


@register_module(nn.PReLU)
class PReLUModule(OpHandler):
    """One slope per channel (num_parameters=C) or one for all."""

    def analyze(self, ctx, node):
        mod = ctx.get_submodule(node.target)
        lay = passthrough_layout(ctx, node, node.args[0])
        if isinstance(lay, Layout) and mod.num_parameters > 1:
            ctx.member(f"{node.target}.weight", 0, lay.ids, "channel", node)
        return lay

    def rewrite(self, rctx, node):
        mod = rctx.get_submodule(node.target)
        mod.num_parameters = read_tensor(mod, "weight").shape[0]


def _along_dim(ctx, node, dim) -> Layout | None:
    lay = ctx.layout(node.args[0])
    if not isinstance(lay, Layout):
        return None
    ndim = ctx.spec(node.args[0]).ndim
    if dim is None or dim % ndim == lay.dim:
        ctx.mark(lay.ids, f"{node.name}: {node.target} mixes values along the channel dim")
    return passthrough_layout(ctx, node, node.args[0])


@register_module(nn.Softmax, nn.LogSoftmax, nn.Softmin)
class SoftmaxModule(OpHandler):
    def analyze(self, ctx, node):
        return _along_dim(ctx, node, ctx.get_submodule(node.target).dim)


@register_function(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax)
@register_method("softmax", "log_softmax")
class SoftmaxFunction(OpHandler):
    def analyze(self, ctx, node):
        return _along_dim(ctx, node, get_arg(node, 1, "dim"))


@register_function(F.normalize)
class NormalizeFunction(OpHandler):
    def analyze(self, ctx, node):
        return _along_dim(ctx, node, get_arg(node, 2, "dim", 1))
