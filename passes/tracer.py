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

import builtins
import contextlib
import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from fxprune.errors import TraceError

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


def _register_mode_reading_modules() -> None:
    """Modules whose forward passes ``self.training`` to a function as a plain bool: traced through,
    the bool of the trace's moment is baked into the graph. torchvision's StochasticDepth does so
    (``stochastic_depth(x, p, mode, self.training)``): a model traced in train mode kept dropping
    residual branches at random in eval mode (a slim ConvNeXt / EfficientNet gave two different
    outputs for one input after ``.eval()``), and one traced in eval mode never dropped them in
    training. As leaves they read their flag when they run. (nn.Dropout and the other torch.nn
    modules are leaves already.) torchvision's DropBlock2d / DropBlock3d pass theirs the same way."""
    try:
        from torchvision.ops import DropBlock2d, DropBlock3d, StochasticDepth
    except ImportError:  # torchvision is optional for tracing user models
        return
    for cls in (StochasticDepth, DropBlock2d, DropBlock3d):
        register_leaf_module(cls, f"reads its training flag when it runs (torchvision {cls.__name__})")


_register_mode_reading_modules()


def _autowrap_modules() -> tuple:
    mods: list = [math]
    try:  # torchvision.ops functions (stochastic_depth, nms, ...) are recorded as calls
        import torchvision.ops

        mods.append(torchvision.ops)
    except ImportError:  # torchvision is optional for tracing user models
        pass
    return tuple(mods)


@contextlib.contextmanager
def preserved_module_state(root: nn.Module):
    """The modules under `root` that run code fxprune does not know, as they were afterwards (also
    when the body raises).

    Tracing calls the forward (and hooks) of traced-through modules with proxies, and shape
    propagation calls leaves and their hooks on meta or fake tensors. Code that assigns an
    attribute (`torch.nn.utils.prune`'s and `weight_norm`'s forward pre-hooks set
    ``module.weight``) would otherwise leave a proxy or a meta tensor in the user's model. Such
    code belongs to a module that is not a plain `torch.nn.modules` class or that has forward
    hooks (every module, while global module hooks are installed): its attribute dict and its
    tables (parameters, buffers, submodules, hooks, name sets) are restored to the very same
    objects. Plain torch.nn modules without hooks assign nothing when called and are not
    snapshotted (snapshotting all of resnet50's took 0.5 ms, 5% of its shape propagation; this
    takes 0.07 ms). Tensor *values* are not copied: the callers run on proxies, meta/fake tensors
    or private copies.
    """
    saved = []
    everything = _module_hooks_installed()
    for m in _all_modules(root):
        d = m.__dict__
        if everything or d["_forward_pre_hooks"] or d["_forward_hooks"] or not type(m).__module__.startswith(
                "torch.nn.modules."):
            saved.append((d, d.copy(), [(v, v.copy()) for v in d.values() if isinstance(v, (dict, list, set))]))
    try:
        yield
    finally:
        for d, state, tables in saved:
            if not _same_entries(d, state):
                d.clear()
                d.update(state)
            for table, before in tables:
                if not _same_entries(table, before):
                    table.clear()
                    (table.extend if isinstance(table, list) else table.update)(before)


def _all_modules(root: nn.Module) -> list[nn.Module]:
    """`root.modules()`, each once (a quicker walk: no qualified names)."""
    out, stack, seen = [], [root], set()
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(m._modules.values())
    return out


def _same_entries(now, before) -> bool:
    """Same keys (in order) and the very same values; never `==` on values (a tensor's is
    elementwise, a proxy's records a node)."""
    if len(now) != len(before):
        return False
    if isinstance(now, dict):
        return all(map(operator.is_, now, before)) and all(map(operator.is_, now.values(), before.values()))
    if isinstance(now, list):
        return all(map(operator.is_, now, before))
    return now == before  # a set of names


def _module_hooks_installed() -> bool:
    """Global module hooks run their code on every module."""
    from torch.nn.modules import module as _m

    return any(getattr(_m, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))


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
    """A Tracer that knows user/registered/automatic leaves and remembers where tracing failed.

    Every argument has a default: a pickled GraphModule records its graph's tracer class and
    unpickling builds one with no arguments to retrace the generated code (`torch.save` of a traced
    or slim model failed with a TypeError before)."""

    def __init__(self, leaf_types: tuple = (), leaf_names: set[str] | None = None,
                 auto_leaves: dict[str, str] | None = None):
        super().__init__(autowrap_modules=_autowrap_modules())
        self.leaf_types = leaf_types
        self.leaf_names = set() if leaf_names is None else leaf_names
        self.auto_leaves = {} if auto_leaves is None else auto_leaves

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
    read_through: dict[str, str] = field(default_factory=dict)  # module path -> reparametrization baked in


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


def _traceable_len(obj):
    """`len`, recorded as a call when given a proxy (`len(x)` is the size of dim 0)."""
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", builtins.len, (obj,), {})
    return builtins.len(obj)


@contextlib.contextmanager
def _len_recorded(model: nn.Module):
    """`len(x)` on a traced tensor becomes a graph node instead of failing the trace.

    fx records `len` only in a module that called ``torch.fx.wrap("len")`` at import; here the
    module-level namespace of every forward in `model` (torch's own excepted) gets
    `_traceable_len` for the duration, where the name is free: the code finds it before the
    builtin, which it calls for anything but a proxy.
    """
    namespaces = {}
    for m in _all_modules(model):
        g = getattr(getattr(type(m), "forward", None), "__globals__", None)
        if isinstance(g, dict) and "len" not in g and not str(g.get("__name__", "")).startswith("torch."):
            namespaces[id(g)] = g
    for g in namespaces.values():
        g["len"] = _traceable_len
    try:
        yield
    finally:
        for g in namespaces.values():
            if g.get("len") is _traceable_len:
                del g["len"]


def _hook_reparametrizations(module: nn.Module) -> list:
    """The `torch.nn.utils.prune` and legacy `torch.nn.utils.weight_norm` pre-hooks of `module`."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.weight_norm import WeightNorm

    return [h for h in module._forward_pre_hooks.values() if isinstance(h, (BasePruningMethod, WeightNorm))]


def _read_through_reparametrizations(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """Leaves whose weight a forward pre-hook computes from other tensors, replaced in `gm` (never
    in `model`) by copies holding that weight as a plain parameter.

    `torch.nn.utils.prune` computes ``weight = weight_orig * weight_mask`` and the legacy
    `torch.nn.utils.weight_norm` ``weight = g * v / ||v||`` before every call: a pure function of
    the module's tensors, so the copy computes exactly what the module computes, and its weight
    can be sliced like any other (slicing `weight_orig` alone would not change what the hook
    computes, and the rewrite would break). The copy is made with the library's own
    ``prune.remove`` / ``remove_weight_norm``. The slim model holds the plain weights.
    Returns {module path: what was read through}.
    """
    from torch.nn.utils import prune
    from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

    done: dict[str, str] = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if node.target in done:
            continue
        module = gm.get_submodule(node.target)
        if not _hook_reparametrizations(module):
            continue
        parent_path, _, name = node.target.rpartition(".")
        parent = gm.get_submodule(parent_path)
        if parent is not gm and parent is model.get_submodule(parent_path):
            continue  # inside a module the GraphModule shares whole: the analysis refuses to slice it
        # the hook's last result is a plain attribute; computed with autograd on it cannot be
        # deep-copied (torch refuses non-leaf tensors), and `remove` recomputes it anyway
        memo = {id(v): v.detach() for v in module.__dict__.values()
                if isinstance(v, torch.Tensor) and v.grad_fn is not None}
        twin = copy.deepcopy(module, memo)
        kinds = []
        for hook in list(twin._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(twin, hook._tensor_name)
                kinds.append(f"torch.nn.utils.prune on {hook._tensor_name}")
            elif isinstance(hook, WeightNorm):
                remove_weight_norm(twin, hook.name)
                kinds.append(f"torch.nn.utils.weight_norm on {hook.name}")
        parent._modules[name] = twin
        done[node.target] = ", ".join(kinds)
    return done


def trace(
    model: nn.Module,
    leaf_modules: Iterable = (),
    concrete_args: dict[str, Any] | None = None,
) -> TracedModel:
    """Symbolically trace `model`; untraceable submodules become leaves automatically.

    The returned GraphModule shares its submodules with `model`: callers must copy before they
    change any parameter (fxprune's rewrite always does). Exceptions: leaves whose weight a
    `torch.nn.utils.prune` or legacy `weight_norm` hook computes are private copies holding the
    computed weight (`TracedModel.read_through`). `model` itself is never modified, not even by
    hooks that tracing runs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    leaf_types, leaf_names = _split_leaf_spec(leaf_modules)
    auto_leaves: dict[str, str] = {}
    max_attempts = sum(1 for _ in model.modules()) + 1
    for _ in range(max_attempts):
        tracer = _LeafAwareTracer(leaf_types, leaf_names, auto_leaves)
        try:
            with preserved_module_state(model), _len_recorded(model):
                graph = tracer.trace(model, concrete_args=concrete_args)
                # built inside: fx stores tensor constants on the root (`_tensor_constant0`), which
                # the GraphModule copies and `model` then loses again
                _default_to_concrete(graph, concrete_args or {})
                gm = _GraphModule(tracer.root, graph, model.__class__.__name__)
        except Exception as exc:  # noqa: BLE001 - every failure is either retried or wrapped
            path = getattr(exc, "_fxprune_module_path", "")
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if not path or path in auto_leaves:
                raise TraceError(path, reason) from exc
            auto_leaves[path] = reason
            continue
        gm.training = model.training  # the root only: submodules are shared with `model`
        read_through = _read_through_reparametrizations(model, gm)
        return TracedModel(gm, auto_leaves, read_through)
    raise TraceError("", "too many untraceable submodules")  # pragma: no cover - bounded above
