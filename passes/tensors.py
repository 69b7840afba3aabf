"""Reading and replacing a GraphModule's parameters and buffers by qualified name."""
from __future__ import annotations

import torch
from torch import nn


def get_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def has_tensor(gm: nn.Module, target: str) -> bool:
    try:
        get_tensor(gm, target)
        return True
    except AttributeError:
        return False


def set_tensor(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace a parameter (keeping requires_grad), a buffer, or a plain tensor attribute."""
    owner_path, _, name = target.rpartition(".")
    replace_tensor(gm.get_submodule(owner_path) if owner_path else gm, name, value)


def replace_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """`set_tensor` on the module that owns the tensor."""
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
