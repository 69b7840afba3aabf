"""torch.fx tracing with a leaf-module registry and automatic leaves.

`trace(model)` runs `torch.fx` symbolic tracing. When a submodule's code cannot be traced (Python
control flow on tensor values, calls fx cannot record), that submodule becomes a *leaf*: it is
recorded as one opaque `call_module` node, tracing goes on, and the dependency analysis later
treats the leaf as a boundary (its channels stay). Only when the model's own `forward` fails is a
`TraceError` raised.

Example::

    >>> import torchvision, fxprune
    >>> traced = fxprune.trace(torchvision.models.resnet18())
    >>> traced.graph_module.graph.find_nodes(op="placeholder")[0].name
    'x'
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

# Module types that are always recorded whole. The value says why (shown in reports).
_LEAF_REGISTRY: dict[type, str] = {}


try:  # torch >= 2.2: generates and compiles the Python code on first use, not at construction
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - older torch
    _GraphModule = fx.GraphModule
# The traced model is mostly read (shapes, analysis, copies for the rewrite), not called: its code
# is generated lazily, which is a quarter of the trace's time (resnet50: ~5 ms of ~15).


def register_leaf_module(cls: type, reason: str = "registered leaf") -> type:
    """Always trace `cls` as one opaque node. Usable as a class decorator."""
    _LEAF_REGISTRY[cls] = reason
    return cls


def _autowrap_modules() -> tuple:
    mods: list = [math]
    try:  # torchvision.ops functions (stochastic_depth, nms, ...) are recorded as calls
        import torchvision.ops

        mods.append(torchvision.ops)
    except ImportError:  # torchvision is optional for tracing user models
        pass
    return tuple(mods)


class _InPlaceAddProxy(fx.Proxy):
    """A Proxy that records ``a += b`` as ``operator.iadd``, as the model's code does it.

    `fx.Proxy` has no ``__iadd__``, so Python falls back to ``__add__`` and the traced graph
    allocates a new tensor where the model reused one: torchvision's ``out += identity`` in every
    residual block. On a 2-core CPU at batch 32 that costs resnet50 about 7% (traced vs eager) and
    its slim model about 9%. fx prints iadd nodes as ``a += b``; the analysis and structure passes
    treat them as adds.
    """

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _LeafAwareTracer(fx.Tracer):
    """A Tracer that knows user/registered/automatic leaves and remembers where tracing failed."""

    def __init__(self, leaf_types: tuple, leaf_names: set[str], auto_leaves: dict[str, str]):
        super().__init__(autowrap_modules=_autowrap_modules())
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.auto_leaves = auto_leaves

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceAddProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or qualname in self.auto_leaves:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if type(m) in _LEAF_REGISTRY:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised; we only tag the innermost module
            if not hasattr(exc, "_fxprune_module_path"):
                exc._fxprune_module_path = self.path_of_module(m)
            raise


@dataclass
class TracedModel:
    """A traced model and what tracing had to give up on."""

    graph_module: fx.GraphModule
    auto_leaves: dict[str, str] = field(default_factory=dict)  # module path -> fx reason
    user_leaves: set[str] = field(default_factory=set)


def _split_leaf_spec(leaf_modules: Iterable) -> tuple[tuple, set[str]]:
    types, names = [], set()
    for item in leaf_modules or ():
        if isinstance(item, type):
            types.append(item)
        elif isinstance(item, str):
            names.add(item)
        else:
            raise TypeError(
                f"leaf_modules entries must be module types or qualified names, got {item!r}"
            )
    return tuple(types), names


def _default_to_concrete(graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """fx keeps a placeholder for each concrete argument (asserting its value) whose default is
    the signature's; make the default the concrete value so the module runs without it."""
    import re

    for node in graph.find_nodes(op="placeholder"):
        name = re.sub(r"_\d+$", "", node.target)
        for key in (node.target, name):
            if key in concrete_args and not isinstance(concrete_args[key], torch.Tensor):
                node.args = (concrete_args[key],)
                break


def trace(
    model: nn.Module,
    leaf_modules: Iterable = (),
    concrete_args: dict[str, Any] | None = None,
) -> TracedModel:
    """Symbolically trace `model`; untraceable submodules become leaves automatically.

    The returned GraphModule shares its submodules with `model`: callers must copy before they
    change any parameter (fxprune's rewrite always does).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    leaf_types, leaf_names = _split_leaf_spec(leaf_modules)
    auto_leaves: dict[str, str] = {}
    max_attempts = sum(1 for _ in model.modules()) + 1
    for _ in range(max_attempts):
        tracer = _LeafAwareTracer(leaf_types, leaf_names, auto_leaves)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # noqa: BLE001 - every failure is either retried or wrapped
            path = getattr(exc, "_fxprune_module_path", "")
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if not path or path in auto_leaves:
                raise TraceError(path, reason) from exc
            auto_leaves[path] = reason
            continue
        _default_to_concrete(graph, concrete_args or {})
        gm = _GraphModule(tracer.root, graph, model.__class__.__name__)
        gm.training = model.training  # the root only: submodules are shared with `model`
        return TracedModel(gm, auto_leaves, leaf_names)
    raise TraceError("", "too many untraceable submodules")  # pragma: no cover - bounded above
