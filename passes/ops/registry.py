"""The handler registry: rules as data, one driver.

Handlers are keyed by module type (`call_module`), function object (`call_function`) or method
name (`call_method`). A module whose class merely subclasses a registered type without overriding
`forward` uses the base handler; one that overrides `forward` does not (its code may do anything).
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

_MODULES: dict[type, "OpHandler"] = {}
_FUNCTIONS: dict[Callable, "OpHandler"] = {}
_METHODS: dict[str, "OpHandler"] = {}


class OpHandler:
    """One op kind: how its channels couple (analyze) and how it is rewritten when pruned."""

    def analyze(self, ctx, node: fx.Node) -> Any:
        """Couple/mark/register members; return the output layout (or None)."""
        raise NotImplementedError

    def rewrite(self, rctx, node: fx.Node) -> None:
        """Fix module attributes or node arguments after the member tensors were sliced."""

    def reference(self, channels, ref, node: fx.Node, keep_root) -> None:
        """Edit the masked reference `ref` (a copy of the analysed GraphModule) at `node`, for an op
        whose slim form is not the original with zeroed inputs (`passes.mask`); most ops need nothing."""


def register_module(*types: type) -> Callable:
    def deco(cls):
        for t in types:
            _MODULES[t] = cls()
        return cls

    return deco


def register_function(*fns: Callable) -> Callable:
    def deco(cls):
        for fn in fns:
            _FUNCTIONS[fn] = cls()
        return cls

    return deco


def register_method(*names: str) -> Callable:
    def deco(cls):
        for name in names:
            _METHODS[name] = cls()
        return cls

    return deco


def _module_handler(mod: nn.Module) -> OpHandler | None:
    cls = type(mod)
    if cls in _MODULES:
        return _MODULES[cls]
    for base in cls.__mro__[1:]:
        if base in _MODULES:
            return _MODULES[base] if cls.forward is base.forward else None
    return None


def handler_for(node: fx.Node, gm) -> OpHandler | None:
    """The handler of `node`; `gm` is anything with `get_submodule` (a module, a RewriteContext)."""
    if node.op == "call_module":
        return _module_handler(gm.get_submodule(node.target))
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def get_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call, whether it was passed by position or keyword."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def get_attr_target(arg: Any) -> str | None:
    """The parameter name when `arg` is a get_attr node, else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return arg.target
    return None
