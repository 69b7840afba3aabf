"""Fold per-channel scales (gates, masks) into the layer that produces the channels.

`y = producer(x) * s` with `s` a parameter that varies only along the channel dim becomes the
producer with scaled weights: for a BatchNorm/GroupNorm/InstanceNorm the affine weight and bias
are multiplied by `s`; for a conv/linear its output rows and bias. The mul node and the scale
parameter disappear. Method passes list the parameters to fold in `PruningPlan.fold_scales`.

Example::

    >>> slim = fold_channel_scales(slim, ["gates.g3"])
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .tensors import delete_tensor, get_tensor

_MULS = (operator.mul, torch.mul, "mul")
_AFFINE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _channel_vector(scale: torch.Tensor, out_ndim: int, channel_dim: int) -> torch.Tensor | None:
    """The scale as a 1-D vector if it varies only along `channel_dim` of the output."""
    shape = [1] * (out_ndim - scale.ndim) + list(scale.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != channel_dim):
        return None
    return scale.reshape(-1)


def _scale_rows(owner: nn.Module, name: str, s: torch.Tensor, dim: int = 0) -> None:
    p = getattr(owner, name)
    shape = [1] * p.ndim
    shape[dim] = -1
    setattr(owner, name, nn.Parameter((p.detach() * s.reshape(shape)).to(p.dtype), requires_grad=p.requires_grad))


def fold_into(mod: nn.Module, s: torch.Tensor) -> bool:
    """Multiply per-channel (or scalar) `s` into `mod`'s output: a norm's affine, or a conv's/linear's
    rows and bias. False when `mod` has nothing to take it. The one fold every method uses."""
    if isinstance(mod, _AFFINE_NORMS) and mod.weight is not None and mod.bias is not None:
        _scale_rows(mod, "weight", s)
        _scale_rows(mod, "bias", s)
        return True
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        _scale_rows(mod, "weight", s)
        if mod.bias is not None:
            _scale_rows(mod, "bias", s)
        return True
    return False


def fold_channel_scales(gm: fx.GraphModule, targets) -> fx.GraphModule:
    """Fold the named scale parameters where their producer allows it; returns `gm` (modified)."""
    targets = set(targets)
    for node in list(gm.graph.nodes):
        if node.target not in _MULS or len(node.args) != 2:
            continue
        params = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr" and a.target in targets]
        if len(params) != 1:
            continue
        param = params[0]
        producer = node.args[1] if node.args[0] is param else node.args[0]
        if not (isinstance(producer, fx.Node) and producer.op == "call_module" and len(producer.users) == 1):
            continue
        mod = gm.get_submodule(producer.target)
        out_ndim = producer.meta["fxprune_value"].ndim if "fxprune_value" in producer.meta else 4
        channel_dim = out_ndim - 1 if isinstance(mod, nn.Linear) else 1
        s = _channel_vector(get_tensor(gm, param.target), out_ndim, channel_dim)
        if s is None or not fold_into(mod, s.detach()):
            continue
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        if not param.users:
            gm.graph.erase_node(param)
            delete_tensor(gm, param.target)
    gm.graph.lint()
    gm.recompile()
    return gm
