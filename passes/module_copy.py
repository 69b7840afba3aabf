"""A deep copy of a GraphModule that shares chosen tensors and copies plain modules fast.

Why: the rewrite must never touch the user's model, so it works on a private copy. Python's
`copy.deepcopy` walks every attribute of every module (about 60 deepcopy calls per module, hook
dicts included): on resnet50 that was ~45 ms, more than half of the whole rewrite. Most modules
hold only their tensors, immutable settings (ints, tuples, strings), hook dicts and child
modules; for those a new object with a shallow copy of the attribute dict, fresh containers,
copied tensors and copied children *is* their deep copy. Such copies are made bottom-up and put
in deepcopy's memo first; a module that holds anything else (a registered hook, a list of
tensors, any other object) or whose class customises copying or pickling still goes through
`copy.deepcopy`, unchanged, and so does whatever references the fast copies.

Tensors named in `shared_targets` are not copied at all: the rewrite replaces them with sliced
copies anyway, so copying them first would only double the time and the peak memory. Except the
tensors of a `torch.nn.utils.parametrize` parametrization: setting a parametrized weight writes
its originals in place (`set_`), so the copy always owns them (else the user's model would change).

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
import functools
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from .tensors import is_parametrized

# Values a module may hold that need no copy (immutable, or shared by design).
_ATOMIC = (int, float, bool, str, bytes, type(None), complex, torch.dtype, torch.device, enum.Enum, type)
_ATOMIC_TYPES = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))
# How a class can change what deepcopy does; torch.nn's own __setstate__ only fills attributes
# missing from old pickles, so it is allowed there.
_COPY_PROTOCOL = ("__deepcopy__", "__copy__", "__reduce_ex__", "__reduce__", "__getstate__",
                  "__getnewargs_ex__", "__getnewargs__", "__new__")
_TENSOR_STORES = ("_parameters", "_buffers")


def _is_atomic(value) -> bool:
    kind = type(value)
    if kind in _ATOMIC_TYPES:
        return True
    if kind is tuple:
        return all(map(_is_atomic, value))
    return isinstance(value, _ATOMIC)


@functools.lru_cache(maxsize=None)
def _copies_like_module(cls: type) -> bool:
    """deepcopy treats instances of `cls` as it treats a plain nn.Module (their __dict__ is all)."""
    if any(getattr(cls, name, None) is not getattr(nn.Module, name, None) for name in _COPY_PROTOCOL):
        return False
    setstate = getattr(cls, "__setstate__", None)
    return setstate is nn.Module.__setstate__ or cls.__module__.startswith("torch.nn.modules.")


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


def _fast_copy(module: nn.Module, memo: dict) -> nn.Module | None:
    """The deep copy of `module` (its children already in `memo`), or None where it holds anything
    but atomic values, containers of them, tensors and modules (see the module docstring)."""
    if not _copies_like_module(type(module)):
        return None
    state = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC_TYPES or key in _TENSOR_STORES:
            state[key] = value
        elif key == "_modules":
            if not all(c is None or id(c) in memo for c in value.values()):
                return None
            state[key] = {k: None if c is None else memo[id(c)] for k, c in value.items()}
        elif isinstance(value, (dict, list, set)):  # hook dicts, name sets
            items = value.items() if isinstance(value, dict) else ((v, None) for v in value)
            if not all(_is_atomic(k) and _is_atomic(v) for k, v in items):
                return None  # e.g. a registered hook: deepcopy decides what to do with it
            state[key] = kind(value)
        elif _is_atomic(value):
            state[key] = value
        else:
            return None
    state.pop("_compiled_call_impl", None)  # as nn.Module.__getstate__ drops it
    for key in _TENSOR_STORES:
        if key in state:
            state[key] = {k: None if t is None else _copy_tensor(t, memo) for k, t in state[key].items()}
    new = object.__new__(type(module))
    new.__dict__.update(state)
    return new


def _not_shareable(module: nn.Module, name: str) -> bool:
    """`module.name` is computed (a parametrization) or is a parametrization's original: setting
    the computed tensor writes the originals in place (`set_`), so a copy must own them."""
    if isinstance(module, ParametrizationList):
        return True
    return is_parametrized(module, name)


def _memo(gm: nn.Module, shared_targets: Iterable[str]) -> dict[int, object]:
    """deepcopy's memo: shared tensors map to themselves, plain modules to fast copies."""
    memo: dict[int, object] = {}
    modules = dict(gm.named_modules())
    for target in shared_targets:
        owner, _, name = target.rpartition(".")
        module = modules.get(owner)
        if module is None or _not_shareable(module, name):
            continue
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            memo[id(t)] = t
    for module in modules.values():  # a hook's (or custom code's) last result, computed with
        d = module.__dict__  # autograd: deepcopy refuses such a tensor, so it is copied detached
        if d["_forward_pre_hooks"] or d["_forward_hooks"] or not type(module).__module__.startswith(
                "torch.nn.modules."):
            for value in d.values():
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    memo[id(value)] = value.detach().clone()
    for module in reversed(list(modules.values())):  # descendants before their ancestors
        if module is not gm and id(module) not in memo:
            twin = _fast_copy(module, memo)
            if twin is not None:
                memo[id(module)] = twin
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
