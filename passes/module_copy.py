"""A deep copy of a GraphModule that shares chosen tensors and copies plain torch.nn leaves fast.

Why: the rewrite must never touch the user's model, so it works on a private copy. Python's
`copy.deepcopy` walks every attribute of every module (about 60 deepcopy calls per module, hook
dicts included): on resnet50 that is ~45 ms, more than half of the whole rewrite. Leaf modules
defined by torch.nn itself (Conv2d, BatchNorm2d, ReLU, Linear...) hold only their tensors,
immutable settings and hook dicts, so a shallow attribute copy plus copies of their tensors is a
true deep copy of them. Those copies are put in deepcopy's memo first; everything else (the
GraphModule, containers, user-defined modules and whatever they hold) still goes through
`copy.deepcopy`, unchanged.

Tensors named in `shared_targets` are not copied at all: the rewrite replaces them with sliced
copies anyway, so copying them first would only double the time and the peak memory.

Example::

    >>> import torch, torchvision
    >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18())
    >>> twin = copy_sharing(gm, ["conv1.weight"])
    >>> twin.conv1.weight is gm.conv1.weight, twin.fc.weight is gm.fc.weight, twin.conv1 is gm.conv1
    (True, False, False)
"""
from __future__ import annotations

import copy
import enum
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn


# Values a torch.nn leaf may hold that need no copy (immutable, or shared by design).
_ATOMIC = (int, float, bool, str, bytes, type(None), complex, torch.dtype, torch.device, enum.Enum, type)


_ATOMIC_TYPES = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))


def _is_atomic(value) -> bool:
    kind = type(value)
    if kind in _ATOMIC_TYPES:
        return True
    if kind is tuple:
        return all(map(_is_atomic, value))
    return isinstance(value, _ATOMIC)


def _is_atomic_container(value) -> bool:
    """A dict/list/set (hook dicts, name sets) holding only atomic values: a new container of the
    same entries is its deep copy. Registered hooks (callables) do not qualify: they go the slow way."""
    if isinstance(value, dict):
        return not value or all(map(_is_atomic, value)) and all(map(_is_atomic, value.values()))
    if isinstance(value, (list, set)):
        return all(map(_is_atomic, value))
    return False


def _is_plain_torch_leaf(module: nn.Module) -> bool:
    if not type(module).__module__.startswith("torch.nn.modules.") or module._modules:
        return False
    return all(k in ("_parameters", "_buffers") or _is_atomic(v) or _is_atomic_container(v)
               for k, v in module.__dict__.items())


def _copy_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    """deepcopy of a parameter or buffer; a plain one that owns its whole storage is cloned
    directly (`Tensor.__deepcopy__` is a slow Python path, ~50 us for a BN's step counter)."""
    if id(t) in memo:
        return memo[id(t)]
    plain = (type(t) in (torch.Tensor, nn.Parameter) and t._base is None and not t.__dict__
             and t.layout == torch.strided and t.storage_offset() == 0
             and t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous())
    if not plain:
        return copy.deepcopy(t, memo)
    new = t.detach().clone()
    if type(t) is nn.Parameter:
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    memo[id(t)] = new
    return new


def _copy_leaf(module: nn.Module, memo: dict) -> nn.Module:
    new = object.__new__(type(module))
    state = {}
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers"):
            value = {k: (None if t is None else _copy_tensor(t, memo)) for k, t in value.items()}
        elif not _is_atomic(value):
            value = type(value)(value)  # an atomic container (see _is_plain_torch_leaf)
        state[key] = value
    new.__dict__.update(state)
    return new


def _memo(gm: nn.Module, shared_targets: Iterable[str]) -> dict[int, object]:
    """deepcopy's memo: shared tensors map to themselves, plain torch.nn leaves to fast copies."""
    memo: dict[int, object] = {}
    modules = dict(gm.named_modules())
    for target in shared_targets:
        owner, _, name = target.rpartition(".")
        t = getattr(modules[owner], name, None) if owner in modules else None
        if isinstance(t, torch.Tensor):
            memo[id(t)] = t
    for module in modules.values():
        if module is not gm and id(module) not in memo and _is_plain_torch_leaf(module):
            memo[id(module)] = _copy_leaf(module, memo)
    return memo


def copy_sharing(gm: nn.Module, shared_targets: Iterable[str]) -> nn.Module:
    """Deep copy of `gm` in which the tensors named in `shared_targets` are shared, not copied."""
    return copy.deepcopy(gm, _memo(gm, shared_targets))


def copy_parts(gm: fx.GraphModule, shared_targets: Iterable[str]) -> tuple[nn.Module, fx.Graph]:
    """`copy_sharing` taken apart: a plain root module holding deep copies of `gm`'s children,
    tensors and root-level attributes the graph reads, and a copy of its graph.

    A rewrite edits both and builds its GraphModule once at the end (`fx.GraphModule(root, graph)`
    keeps what the graph uses): deep-copying the GraphModule itself would generate and compile its
    Python code once more, for nothing (~5 ms on resnet50).
    """
    memo = _memo(gm, shared_targets)
    root = nn.Module()
    root.training = gm.training
    for name, child in gm.named_children():
        root._modules[name] = copy.deepcopy(child, memo)
    for store in ("_parameters", "_buffers"):
        getattr(root, store).update({k: copy.deepcopy(v, memo) for k, v in getattr(gm, store).items()})
    root._non_persistent_buffers_set = set(gm._non_persistent_buffers_set)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not hasattr(root, node.target.split(".")[0]):
            head = node.target.split(".")[0]
            object.__setattr__(root, head, copy.deepcopy(getattr(gm, head), memo))
    return root, copy.deepcopy(gm.graph)
