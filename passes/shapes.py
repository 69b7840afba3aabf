"""Shape propagation: every node's output spec and MACs in `node.meta`.

`propagate(gm, inputs)` runs the graph once on fake tensors (no memory, no compute), falling back to
real tensors on a private copy when an op has no fake implementation. It writes

* ``node.meta["fxprune_value"]``: the output with every tensor replaced by a `TensorSpec`
  (shape, dtype); Python values (sizes from ``x.size(0)``) are kept as they are;
* ``node.meta["fxprune_macs"]``: multiply-accumulates of the node, as
  `torch.utils.flop_counter.FlopCounterMode` counts them (its FLOPs / 2).

Example::

    >>> import torch, torchvision, fxprune
    >>> from fxprune.passes.shapes import propagate
    >>> gm = fxprune.trace(torchvision.models.resnet18()).graph_module
    >>> propagate(gm, fxprune.ExampleInputs.normalize(torch.randn(1, 3, 224, 224)))
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["fxprune_value"].shape
    (1, 64, 112, 112)
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch._prims_common as _prims
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode

from fxprune.errors import InputError

from .inputs import ExampleInputs
from .tracer import preserved_module_state

VALUE = "fxprune_value"
MACS = "fxprune_macs"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def spec_of(value: Any) -> Any:
    """Replace each tensor in a (nested) value by its TensorSpec."""

    def one(x):
        if isinstance(x, torch.Tensor):
            return TensorSpec(tuple(int(s) for s in x.shape), x.dtype)
        return x

    if isinstance(value, torch.Tensor):  # most nodes: no pytree walk
        return one(value)
    return pytree.tree_map(one, value)


def _mutable(value: Any) -> Any:
    """fx's immutable containers as plain lists and dicts, recursively. Tuple subclasses stay what
    they are: a namedtuple, a `torch.return_types` result (`x.max(1)`, read by `.values`), a
    `torch.Size` (`x.shape.numel()`)."""
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


# Modules whose output is a tensor shaped, typed and laid out like their single input, and in which
# FlopCounterMode counts no MACs. On meta tensors their kernels are Python decompositions and
# reference implementations (a BatchNorm costs ~1 ms, a third of resnet50's shape propagation), so
# `_Propagator` writes the output spec directly: `torch.empty_like(input)`. Exact types only (a
# subclass may override forward), no hooks, and the checks their own forward would make first.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_NORM_NDIM = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _same_shape_module(mod: nn.Module, x: Any) -> bool:
    """`mod(x)` is known to be `empty_like(x)` on the meta device (see `_ELEMENTWISE_MODULES`)."""
    if not isinstance(x, torch.Tensor) or x.device.type != "meta" or mod._forward_hooks or mod._forward_pre_hooks:
        return False
    cls = type(mod)
    if cls in _ELEMENTWISE_MODULES:
        return True
    if cls in _NORM_NDIM:
        return x.ndim in _NORM_NDIM[cls] and x.shape[1] == mod.num_features and x.is_floating_point()
    if cls is nn.LayerNorm:
        n = len(mod.normalized_shape)
        return x.is_floating_point() and tuple(x.shape[x.ndim - n:]) == tuple(mod.normalized_shape)
    if cls is nn.GroupNorm:
        return x.is_floating_point() and x.ndim >= 2 and x.shape[1] == mod.num_channels
    return False


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _conv_on_meta(mod: nn.Module, x: Any) -> tuple[torch.Tensor, int] | None:
    """(output, MACs) of an exact Conv1d/2d/3d on a contiguous batched meta input, from the shape
    formula: the meta kernel and FlopCounterMode's dispatch cost ~1/3 of resnet50's propagation.

    MACs as FlopCounterMode counts a convolution: batch x out positions x C_out x C_in/groups x
    kernel volume (the bias is not counted). None where the formula might not be what the kernel
    does (a subclass, hooks, another layout or dtype, an unbatched input): run the module then.
    """
    dims = _CONV_DIMS.get(type(mod))
    if (dims is None or not isinstance(x, torch.Tensor) or x.device.type != "meta" or x.ndim != dims + 2
            or mod._forward_hooks or mod._forward_pre_hooks or x.shape[1] != mod.in_channels
            or not x.is_floating_point() or x.dtype != mod.weight.dtype or not x.is_contiguous()
            or not mod.weight.is_contiguous()):
        return None
    suggest = getattr(_prims, "suggest_memory_format", None)
    if suggest is None or suggest(x) != torch.contiguous_format:
        return None
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        k, s, d = mod.kernel_size[i], mod.stride[i], mod.dilation[i]
        if mod.padding == "same":
            spatial.append(size)
            continue
        p = 0 if mod.padding == "valid" else mod.padding[i]
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out <= 0:
            return None  # let the kernel raise its own error
        spatial.append(out)
    shape = (x.shape[0], mod.out_channels, *spatial)
    macs = x.shape[0] * mod.out_channels * (mod.in_channels // mod.groups)
    for v in (*spatial, *mod.kernel_size):
        macs *= v
    return torch.empty(shape, dtype=x.dtype, device="meta"), macs


try:  # the Python dispatch keys, through which FlopCounterMode sees every op (~20 us each)
    _PYTHON_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.Python)
                    | torch._C.DispatchKeySet(torch._C.DispatchKey.PythonTLSSnapshot))
except AttributeError:  # pragma: no cover - a torch without them: create through the modes
    _PYTHON_KEYS = None


def _outside_modes():
    """Plain meta tensors created by the shortcuts need no counting: skip the dispatch modes
    (a tenth of the cost of creating them through FlopCounterMode)."""
    return torch._C._ExcludeDispatchKeyGuard(_PYTHON_KEYS) if _PYTHON_KEYS is not None else contextlib.nullcontext()


def _module_hooks_installed() -> bool:
    """Global module hooks (a profiler's, a user's) must see every call: then no shortcut."""
    from torch.nn.modules import module as _m

    return any(getattr(_m, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_forward_hooks_always_called"))


class _Propagator(fx.Interpreter):
    """Records each node's output spec and the MACs FlopCounterMode saw while it ran."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, shortcuts: bool = False):
        super().__init__(gm)
        self.counter = counter
        self.shortcuts = shortcuts
        self.formula_macs = 0  # MACs of the node being run that no kernel ran for (`_conv_on_meta`)

    def call_module(self, target, args, kwargs):
        if self.shortcuts and len(args) == 1 and not kwargs:
            mod = self.submodules[target] if target in self.submodules else self.module.get_submodule(target)
            if _same_shape_module(mod, args[0]):
                x = args[0]  # empty_like of a dense tensor has its strides; empty_strided skips the
                # layout inference empty_like runs on meta tensors
                if not x.is_contiguous():
                    return torch.empty_like(x)
                with _outside_modes():
                    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            with _outside_modes():
                conv = _conv_on_meta(mod, args[0])
            if conv is not None:
                self.formula_macs += conv[1]
                return conv[0]
        return super().call_module(target, args, kwargs)

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        """Plain lists/dicts, as the generated code passes them: fx's immutable containers break
        wrapped functions that edit their arguments (torchvision's 3-D Swin window sizes)."""
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        self.formula_macs = 0
        try:
            result = super().run_node(n)
        except Exception as exc:
            exc._fxprune_node = n
            raise
        n.meta[VALUE] = spec_of(result)
        n.meta[MACS] = (self.counter.get_total_flops() - before) // 2 + self.formula_macs
        return result


@contextlib.contextmanager
def standard_attention_path():
    """Attention on the path FlopCounterMode can count, whatever the device and grad mode.

    nn.MultiheadAttention's inference fast path hides its projections, and the CPU flash kernel
    of scaled_dot_product_attention has no flop formula; the math path of both is counted.
    """
    with contextlib.ExitStack() as stack:
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            before = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, before)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # older torch: nothing to pin
            pass
        yield


def _run(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    flat_args = _flat_placeholder_args(gm, inputs)
    shortcuts = not _module_hooks_installed()  # before the counter installs its own module hooks
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), standard_attention_path(), counter:
        _Propagator(gm, counter, shortcuts).run(*flat_args)


def _run_on_meta(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    """Fastest: parameters swapped for meta tensors for the duration of one run."""
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*gm.named_parameters(), *gm.named_buffers()]
    }
    with _reparametrize_module(gm, meta):
        _run(gm, inputs.map_tensors(lambda t: torch.empty_like(t, device="meta")))


def _run_on_fake(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    """Fake tensors everywhere (parameters too: a train-mode BN's in-place updates stay fake)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = {name: mode.from_tensor(t) for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
        fake_inputs = inputs.map_tensors(mode.from_tensor)
        with _reparametrize_module(gm, fake):
            _run(gm, fake_inputs)


def _run_for_real(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    # On a copy: a train-mode BatchNorm must not touch the user's running statistics.
    private = copy.deepcopy(gm)
    _run(private, inputs)
    for src, dst in zip(private.graph.nodes, gm.graph.nodes):
        dst.meta[VALUE] = src.meta[VALUE]
        dst.meta[MACS] = src.meta[MACS]


def _flat_placeholder_args(gm: fx.GraphModule, inputs: ExampleInputs) -> list:
    """Placeholders in order, taking positional inputs first, then keyword ones, then defaults."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(inputs.args)
    if len(args) > len(placeholders):
        raise InputError(
            f"the model takes {len(placeholders)} inputs but example_inputs has {len(args)}"
        )
    unknown = set(inputs.kwargs) - {p.target.lstrip("*") for p in placeholders}
    if unknown:
        raise InputError(f"example_inputs names arguments the model does not take: {sorted(unknown)}")
    values = []
    for i, p in enumerate(placeholders):
        name = p.target.lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in inputs.kwargs:
            values.append(inputs.kwargs[name])
        elif p.args:
            values.append(p.args[0])  # the parameter's default value
        else:
            raise InputError(f"example_inputs gives no value for the model's argument '{name}'")
    return values


def propagate(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    """Annotate every node of `gm` with its output spec and MACs (see module docstring).

    Tries meta tensors, then fake tensors, then real tensors; the last error is the one reported.
    `gm`'s modules (shared with the user's model) are left exactly as they were, whatever hooks
    the run calls (see `fxprune.passes.tracer.preserved_module_state`).
    """
    _flat_placeholder_args(gm, inputs)  # structural mistakes fail fast, with their own message
    for strategy in (_run_on_meta, _run_on_fake):
        try:
            with preserved_module_state(gm):
                strategy(gm, inputs)
            return
        except Exception:  # noqa: BLE001 - an op without a meta/fake kernel: next strategy
            continue
    try:
        with preserved_module_state(gm):
            _run_for_real(gm, inputs)
    except Exception as exc:  # noqa: BLE001 - wrapped with the failing node's name
        node = getattr(exc, "_fxprune_node", None)
        where = f"node '{node.name}' ({node.op} {node.target})" if node is not None else "the model"
        shapes = [tuple(t.shape) for t in inputs.tensors()]
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(
            f"the example inputs (tensor shapes {shapes}) do not fit the model: {where} raised "
            f"{type(exc).__name__}: {first_line}. Pass inputs shaped like a real batch for this model."
        ) from exc
