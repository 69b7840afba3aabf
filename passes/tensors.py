"""Reading and replacing a GraphModule's parameters and buffers by qualified name.

A tensor that a `torch.nn.utils.parametrize` parametrization computes is read with the
parametrizations in eval mode: in training mode reading a spectral norm's weight runs a power
iteration, which changes its state (in the user's model, which the analysis shares).
"""
from __future__ import annotations

import torch
from torch import nn


def is_parametrized(owner: nn.Module, name: str) -> bool:
    """`torch.nn.utils.parametrize.is_parametrized(owner, name)`, without its failing getattr."""
    table = owner._modules.get("parametrizations")
    return table is not None and name in table


def read_tensor(owner: nn.Module, name: str):
    """``getattr(owner, name)``, without side effects on a parametrization's state."""
    if not is_parametrized(owner, name):
        return getattr(owner, name)
    modules = list(owner.parametrizations[name].modules())
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        return getattr(owner, name)
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def present(owner: nn.Module, name: str) -> bool:
    """`owner.name` is a tensor (a bias may be None), found without computing it."""
    if is_parametrized(owner, name):
        return True
    return getattr(owner, name, None) is not None


def get_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return read_tensor(gm.get_submodule(owner) if owner else gm, name)


def set_tensor(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace a parameter (keeping requires_grad), a buffer, or a plain tensor attribute."""
    owner_path, _, name = target.rpartition(".")
    replace_tensor(gm.get_submodule(owner_path) if owner_path else gm, name, value)


def _set_weight_norm(owner: nn.Module, name: str, value: torch.Tensor) -> bool:
    """Set a tensor under one `parametrizations.weight_norm` to `value`; False if it is not one.

    Its right inverse stores g = ||w|| and v = w per slice (along the norm's dim); a slice of `value`
    that is all zeros (a masked input channel of a transposed conv, whose norm runs over dim 0)
    would then compute 0 * 0 / 0 = NaN. There v = 1 instead: g = 0 still makes that slice 0.
    """
    try:
        from torch.nn.utils.parametrizations import _WeightNorm
    except ImportError:  # pragma: no cover - older torch
        return False
    table = owner.parametrizations[name]
    if len(table) != 1 or type(table[0]) is not _WeightNorm or table.is_tensor:
        return False
    with torch.no_grad():
        g, v = table[0].right_inverse(value)
        v = torch.where(g == 0, torch.ones_like(v), v)
        table.original0.set_(g)
        table.original1.set_(v)
    return True


def replace_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """`set_tensor` on the module that owns the tensor. A parametrized tensor is set through its
    parametrization (which stores originals computing `value`), in place on the originals."""
    if is_parametrized(owner, name):
        if not _set_weight_norm(owner, name, value):
            setattr(owner, name, value)
        return
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        if owner._parameters.get(name) is old:
            owner._parameters[name] = new  # what setattr ends with, without its ~20 us of checks
        else:
            setattr(owner, name, new)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def delete_tensor(gm: nn.Module, target: str) -> None:
    owner, _, name = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, name)
