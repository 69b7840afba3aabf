"""The private torch internals fxprune relies on, each checked for what fxprune needs of it.

torch makes no promise about underscored names. Each use is listed here with the behaviour fxprune
depends on, so a torch upgrade that changes one fails here, by name, instead of somewhere deep in a
rewrite. Where fxprune has a fallback (the lazy GraphModule, the preserved-attributes key), the
fallback's assumption is what is tested.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

import fxprune


def test_version_range():
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 5), "pyproject.toml says torch>=2.5"


def test_pytree_knows_namedtuples_and_key_paths():
    import torch.utils._pytree as pytree

    out = torch.return_types.max((torch.zeros(1), torch.zeros(1, dtype=torch.long)))
    flat, _ = pytree.tree_flatten_with_path({"a": out})
    assert len(flat) == 2 and pytree.keystr(flat[0][0]).startswith("['a']")


def test_fake_tensor_mode_and_prims():
    import torch._prims_common as prims
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3))
        assert (x @ x.T).shape == (2, 2)
    assert callable(getattr(prims, "suggest_memory_format", None))  # optional in shapes.py, checked here


def test_reparametrize_module_swaps_and_restores():
    from torch.nn.utils.stateless import _reparametrize_module

    lin = nn.Linear(2, 2)
    before = lin.weight
    with _reparametrize_module(lin, {"weight": torch.zeros(2, 2)}):
        assert float(lin.weight.abs().sum()) == 0
    assert lin.weight is before


def test_dispatch_key_guard_exists():
    assert hasattr(torch._C, "_ExcludeDispatchKeyGuard") and hasattr(torch._C, "DispatchKeySet")
    assert hasattr(torch._C.DispatchKey, "Python") and hasattr(torch._C.DispatchKey, "PythonTLSSnapshot")


def test_global_hook_tables_exist():
    from torch.nn.modules import module as m

    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_forward_hooks_always_called"):
        assert isinstance(getattr(m, name), dict), name
    lin = nn.Linear(1, 1)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_backward_hooks"):
        assert isinstance(getattr(lin, name), dict), name


def test_norm_and_conv_base_classes():
    assert issubclass(nn.BatchNorm2d, nn.modules.batchnorm._BatchNorm)
    assert issubclass(nn.BatchNorm2d, nn.modules.batchnorm._NormBase)
    assert issubclass(nn.InstanceNorm2d, nn.modules.instancenorm._InstanceNorm)
    assert issubclass(nn.ConvTranspose2d, nn.modules.conv._ConvTransposeNd)
    assert issubclass(nn.Conv2d, nn.modules.conv._ConvNd)


def test_lazy_graph_module_compiles_on_demand():
    """Tracing uses the lazy GraphModule when it exists; carrying root hooks compiles it first, since
    its first call compiles and then calls itself again (every hook would run twice)."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        return  # tracer falls back to fx.GraphModule
    gm = _LazyGraphModule(nn.Module(), fx.symbolic_trace(nn.ReLU()).graph)
    assert hasattr(gm, "real_recompile") and hasattr(gm, "_needs_recompile")
    calls = []
    model = nn.Sequential(nn.ReLU())
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    analysis = fxprune.analyze(model, torch.randn(1, 2))
    calls.clear()
    analysis.traced.graph_module(torch.randn(1, 2))
    assert calls == [1]


def test_preserved_attributes_survive_deepcopy():
    import torch.fx.graph_module as gmod

    assert getattr(gmod, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes") == "_user_preserved_attributes"
    gm = fx.symbolic_trace(nn.Linear(2, 2))
    gm.meta["_user_preserved_attributes"] = {"note": 1}
    assert copy.deepcopy(gm).note == 1
