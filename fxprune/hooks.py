"""The root module's hooks, carried onto the modules fxprune builds from it.

torch.fx traces `model.forward`, not `model.__call__`, so hooks registered on the root module
(`model.register_forward_hook(...)`, pre-hooks, backward hooks) are not part of the graph: a slim
model without them computes something else than the user's model, and a verification against a
hook-less reference would not notice. Hooks of submodules need nothing: those of traced-through
submodules are traced into the graph, those of leaf modules stay on the (copied) leaves.

The hooks are the same callables in the same order with the same flags (with_kwargs,
always_call, full backward); they are registered afresh, so removing a handle on the user's model
does not remove it from the slim model and the user's model is never touched.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.fx.graph_module as _fx_graph_module
from torch import nn

_PRESERVED_KEY = getattr(_fx_graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")

# every per-module hook table of nn.Module that changes what a call computes
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                "_backward_hooks")


def root_hooks(module: nn.Module) -> dict[str, OrderedDict]:
    """The non-empty hook tables of `module` itself (not of its children)."""
    return {name: getattr(module, name) for name in _HOOK_TABLES if getattr(module, name, None)}


def carry_root_hooks(source: nn.Module, target: nn.Module) -> nn.Module:
    """Register `source`'s own hooks on `target` (see module docstring); returns `target`."""
    tables = root_hooks(source)
    if tables and getattr(target, "_needs_recompile", lambda: False)():
        # a lazily compiled GraphModule's first call compiles, then calls itself again: every
        # hook would run twice on that call
        target.real_recompile()
    for name, table in tables.items():
        merged = OrderedDict(table)
        merged.update(getattr(target, name))
        setattr(target, name, merged)
    if getattr(source, "_is_full_backward_hook", None) is not None:
        target._is_full_backward_hook = source._is_full_backward_hook
    return target


def preserve_through_deepcopy(gm, **attributes):
    """Set `attributes` on GraphModule `gm` so that they (and its root hooks) survive `copy.deepcopy`,
    which rebuilds a GraphModule from its code and keeps only what its `meta` lists as preserved
    (torch.fx's documented `_user_preserved_attributes` entry). Returns `gm`."""
    preserved = gm.meta.setdefault(_PRESERVED_KEY, {})
    for name, value in attributes.items():
        setattr(gm, name, value)
        preserved[name] = value
    for name, table in root_hooks(gm).items():
        preserved[name] = table
    return gm
