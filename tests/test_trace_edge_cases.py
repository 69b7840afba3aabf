"""Models that trace, but through corners of the tracer, shape propagation and the analysis:

* ops returning `torch.return_types` (``x.max(1).values``, ``torch.sort(x).indices``, unpacking);
* code computing with the channel count (``x / x.shape[1]``, ``c = x.shape[-3]``, ``len(x)``);
* weights computed by reparametrizations (``torch.nn.utils.prune``, weight/spectral norm,
  ``torch.nn.utils.parametrize``), which must never leave the user's model changed.

Every compress here verifies the slim model against the masked original (fxprune's own check);
`prune_and_check` compares them again independently on a random plan.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import fxprune
from fxprune.errors import ConfigError

from .conftest import assert_close_outputs, prune_and_check

X = (2, 3, 8, 8)


def _group(analysis, target: str, dim: int = 0):
    for g in analysis.groups:
        for m in g.members:
            if m.target == target and m.dim == dim:
                return g
    raise AssertionError(f"no group holds {target} dim {dim}")


class OpNet(nn.Module):
    """conv a (prunable whatever `op` does) -> conv b -> op -> head; `op` gets b's output."""

    def __init__(self, op, head_in: int = 8):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(head_in, 4, 1)
        self.op = op

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.head(self.op(y))


def _compress_exact(model, x=None, flops: float = 0.5, **kw):
    x = torch.randn(X) if x is None else x
    slim = fxprune.compress(model, method="l1", example_inputs=x, flops=flops, **kw)
    report = slim.fxprune_report
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-5
    assert report.macs_after < report.macs_before
    return slim


# -- 1. values / indices results ----------------------------------------------------------------

class _MaxUnpacked(nn.Module):
    def forward(self, y):
        values, idx = y.max(3, keepdim=True)
        return values + idx.float() * 0.0 + y


class _Elementwise(nn.Module):
    def forward(self, y):
        return torch.max(y, torch.relu(y)) + torch.min(y, other=y * 0.5)


# keep channels on dim 1 and the 4-D shape the head conv needs
_PER_CHANNEL_OPS = {
    "max_values": lambda y: y.max(2, keepdim=True).values + y,
    "max_getitem": lambda y: torch.max(y, dim=3)[0].unsqueeze(-1) * y,
    "max_unpacked": _MaxUnpacked(),
    "min_indices": lambda y: y + y.min(dim=2, keepdim=True).indices.float(),
    "amax_min_dims": lambda y: y - torch.amax(y, dim=(2, 3), keepdim=True),
    "topk_values": lambda y: y.topk(2, dim=3).values,
    "topk_indices": lambda y: torch.topk(y, 3, 2, largest=False).indices.float(),
    "sort_values": lambda y: torch.sort(y, dim=2, descending=True).values,
    "sort_last_dim": lambda y: y.sort().values * torch.sort(y, stable=True).indices.float(),
    "argsort": lambda y: y * torch.argsort(y, dim=3).float(),
    "median": lambda y: y - torch.median(y, 3, keepdim=True).values,
    "nanmedian": lambda y: y - y.nanmedian(dim=2, keepdim=True)[0],
    "mode": lambda y: y + torch.mode(y).values.unsqueeze(3),  # default dim -1
    "kthvalue": lambda y: y + y.kthvalue(2, 3, True).values,
    "cummax": lambda y: torch.cummax(y, 2).values + y.cummin(dim=3).indices.float(),
    "argmax_spatial": lambda y: y + y.argmax(dim=3, keepdim=True).float(),
    "aminmax": lambda y: y + torch.aminmax(y, dim=3, keepdim=True).max,
    "std_mean": lambda y: (y - torch.std_mean(y, dim=(2, 3), keepdim=True)[1]),
    "elementwise_max_min": _Elementwise(),
}


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


def _op(op):
    return op if isinstance(op, nn.Module) else _Lambda(op)


@pytest.mark.parametrize("name", sorted(_PER_CHANNEL_OPS))
def test_values_indices_ops_keep_channels_prunable(name):
    torch.manual_seed(0)
    model = OpNet(_op(_PER_CHANNEL_OPS[name])).eval()
    x = torch.randn(X)
    analysis, _ = prune_and_check(model, x)
    assert _group(analysis, "b.weight").prunable, _group(analysis, "b.weight").reason
    assert analysis.boundaries == [], [(b.node, b.reason) for b in analysis.boundaries]
    _compress_exact(model, x)


class _MaxUnpackedChannels(nn.Module):
    def forward(self, y):
        values, idx = y.max(1)
        return y * values[:, None] + idx[:, None].float()


# ops over / along the channel dim: b's channels stay, a's group is still pruned
_CHANNEL_OPS = {
    "max_over_channels_unpacked": (_MaxUnpackedChannels(), "reduces over the channel dim"),
    "max_over_channels": (lambda y: y * y.max(1, keepdim=True).values, "reduces over the channel dim"),
    "min_over_channels_getitem": (lambda y: y - torch.min(y, 1, True)[0], "reduces over the channel dim"),
    "argmax_over_channels": (lambda y: y + torch.argmax(y, 1, keepdim=True).float(), "reduces over the channel dim"),
    "max_all": (lambda y: y / y.max(), "reduces over the channel dim"),
    "median_over_channels": (lambda y: y - y.median(dim=-3, keepdim=True).values, "reduces over the channel dim"),
    "topk_channels": (lambda y: y.topk(8, dim=1).values, "along the channel dim"),
    "sort_channels": (lambda y: torch.sort(y, 1).values, "along the channel dim"),
    "sort_channels_indices": (lambda y: y * torch.sort(y, -3).indices.float(), "along the channel dim"),
    "cummax_channels": (lambda y: torch.cummax(y, dim=1).values, "along the channel dim"),
}


@pytest.mark.parametrize("name", sorted(_CHANNEL_OPS))
def test_values_indices_ops_over_the_channel_dim_keep_those_channels(name):
    fn, reason = _CHANNEL_OPS[name]
    torch.manual_seed(0)
    model = OpNet(_op(fn)).eval()
    x = torch.randn(X)
    analysis = fxprune.analyze(model, x)
    g = _group(analysis, "b.weight")
    assert not g.prunable and reason in g.reason
    assert _group(analysis, "a.weight").prunable
    prune_and_check(model, x)
    _compress_exact(model, x)


def test_structseq_output_of_the_model_is_kept_whole():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).max(3)

    model = Net().eval()
    x = torch.randn(X)
    slim = _compress_exact(model, x)
    out = slim(x)
    assert type(out).__name__ == "max" and out.values.shape == (2, 6, 8)


# -- 2. code computing with the channel count ---------------------------------------------------

class _ShapeUnpacked(nn.Module):
    def forward(self, y):
        n, c, h, w = y.shape
        return y / c


class _SizeUnpackedSlice(nn.Module):
    def forward(self, y):
        c, h, w = y.size()[1:]
        return y * (h * w) / c


_CHANNEL_COUNT_FORMS = {
    "shape_index": lambda y: y / y.shape[1],
    "shape_negative_index": lambda y: y / y.shape[-3],
    "shape_unpacked": _ShapeUnpacked(),
    "size_slice_unpacked": _SizeUnpackedSlice(),
    "size_dim": lambda y: y / y.size(1),
    "size_dim_keyword": lambda y: y / y.size(dim=-3),
    "size_index": lambda y: y / y.size()[1],
    "numel": lambda y: y / y.numel(),
    "torch_numel": lambda y: y * (1.0 / torch.numel(y)),
    "shape_numel": lambda y: y / y.shape.numel(),
    "shape_in_arithmetic": lambda y: y * (y.shape[1] + 1),
    "small_effect": lambda y: y + 1e-3 * y.shape[1],
    "len_on_channel_dim": lambda y: y / len(y.transpose(0, 1)),
}


@pytest.mark.parametrize("name", sorted(_CHANNEL_COUNT_FORMS))
def test_channel_count_in_arithmetic_is_a_boundary(name):
    torch.manual_seed(0)
    model = OpNet(_op(_CHANNEL_COUNT_FORMS[name])).eval()
    x = torch.randn(X)
    analysis = fxprune.analyze(model, x)
    g = _group(analysis, "b.weight")
    assert not g.prunable
    assert "channel count" in g.reason or "element count" in g.reason, g.reason
    assert analysis.boundaries, "the size read is listed as a boundary"
    assert _group(analysis, "a.weight").prunable
    _compress_exact(model, x)


class _SizesOnlyInShapes(nn.Module):
    def forward(self, y):
        n, c, h, w = y.shape
        z = y.reshape(n, c, h * w).view(y.size(0), y.size(1), h, w)  # channel count: shapes only
        z = z * (y.shape[2] / 8.0) + z / len(y)  # spatial size and batch size in arithmetic
        return F.interpolate(z, size=y.shape[2:]) + y.expand(y.shape)


def test_sizes_that_only_shape_or_do_not_hold_channels_stay_prunable():
    torch.manual_seed(0)
    model = OpNet(_SizesOnlyInShapes()).eval()
    x = torch.randn(X)
    analysis, _ = prune_and_check(model, x)
    assert _group(analysis, "b.weight").prunable, _group(analysis, "b.weight").reason
    assert analysis.boundaries == [], [(b.node, b.reason) for b in analysis.boundaries]
    _compress_exact(model, x)


def test_parameter_size_in_arithmetic_keeps_its_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
            self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x))) * self.scale
            return self.head(y / self.scale.shape[0])

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(X)
    analysis = fxprune.analyze(model, x)
    assert not _group(analysis, "b.weight").prunable
    assert any("size of scale" in b.reason for b in analysis.boundaries)
    _compress_exact(model, x)


def test_len_of_a_tensor_is_recorded_and_the_builtin_restored():
    from fxprune.passes import tracer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) / len(x)

    gm = fxprune.trace(Net()).graph_module
    assert any(n.target is len for n in gm.graph.nodes)
    assert "len" not in globals() and "len" not in vars(tracer)


# -- 3. reparametrized weights ------------------------------------------------------------------

class Net(nn.Module):
    """conv0 -> bn -> conv3 (reparametrized in the tests) -> conv -> head: every group prunable."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.c5, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.c3(torch.relu(self.bn(self.c0(x))))
        return self.head(torch.relu(self.c5(torch.relu(y))))


_READ_THROUGH = {
    "prune_l1_unstructured": lambda m: prune.l1_unstructured(m.c3, "weight", amount=0.3),
    "prune_ln_structured_twice": lambda m: (prune.ln_structured(m.c3, "weight", 0.25, n=2, dim=0),
                                           prune.random_unstructured(m.c3, "weight", 0.2),
                                           prune.l1_unstructured(m.c3, "bias", 0.5)),
    "weight_norm_legacy": lambda m: nn.utils.weight_norm(m.c3),
    "weight_norm_legacy_dim1": lambda m: nn.utils.weight_norm(m.c5, dim=1),
    "weight_norm_parametrize": lambda m: parametrizations.weight_norm(m.c3),
    "weight_norm_parametrize_dim_none": lambda m: parametrizations.weight_norm(m.c5, dim=None),
}
_REFUSED = {
    "spectral_norm_legacy": (lambda m: nn.utils.spectral_norm(m.c3), "remove_spectral_norm"),
    "spectral_norm_parametrize": (lambda m: parametrizations.spectral_norm(m.c3), "remove_parametrizations"),
    "orthogonal": (lambda m: parametrizations.orthogonal(m.c3), "remove_parametrizations"),
    "custom_parametrization": (lambda m: parametrize.register_parametrization(m.c3, "weight", _Symmetric()),
                               "remove_parametrizations"),
}


class _Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.flip(0)) / 2


def _reparametrized(apply, seed: int = 0, train: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy weight_norm is deprecated
        apply(model)
    with torch.no_grad():  # BN statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    with torch.set_grad_enabled(train):  # the hooks ran; with autograd their results are non-leaf
        model(torch.randn(X))  # tensors, which deepcopy refuses
    return model.train(train)


def _copy(model: nn.Module) -> nn.Module:
    """deepcopy, also of a module holding a hook's non-leaf result (which deepcopy refuses)."""
    memo = {id(v): v.detach() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None}
    return copy.deepcopy(model, memo)


def _snapshot(model: nn.Module):
    state = {k: (v.detach().clone(), v.device, v.dtype, v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}
    hooks = {name: [(type(h).__name__, getattr(h, "_tensor_name", getattr(h, "name", None))) for h in m._forward_pre_hooks.values()]
             for name, m in model.named_modules()}
    attrs = {name: {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)} for name, m in model.named_modules()}
    params = {name: [(k, id(p)) for k, p in m._parameters.items()] for name, m in model.named_modules()}
    kinds = {name: type(m) for name, m in model.named_modules()}
    return state, hooks, attrs, params, kinds, model.training


def _assert_unchanged(model: nn.Module, before) -> None:
    state, hooks, attrs, params, kinds, training = before
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys()
    for k, (value, device, dtype, grad) in state.items():
        t = now[k]
        assert (t.device, t.dtype, t.requires_grad) == (device, dtype, grad), k
        assert torch.equal(t.detach(), value), k
    after = _snapshot(model)
    assert after[1] == hooks
    for name, tensors in attrs.items():  # plain tensor attributes (a hook's result): same objects, on their device
        now_attrs = {k: v for k, v in vars(dict(model.named_modules())[name]).items() if isinstance(v, torch.Tensor)}
        assert now_attrs.keys() == tensors.keys(), name
        assert all(now_attrs[k] is v for k, v in tensors.items()), name
    assert after[3] == params and after[4] == kinds and model.training == training


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", sorted(_READ_THROUGH))
def test_reparametrized_weights_are_read_through(kind, train):
    model = _reparametrized(_READ_THROUGH[kind], train=train)
    before = _snapshot(model)
    reference = _copy(model).eval()
    x = torch.randn(X)
    analysis = fxprune.analyze(model, x)
    _assert_unchanged(model, before)
    with torch.no_grad():  # what the analysis reads computes what the model computes
        assert_close_outputs(reference, copy.deepcopy(analysis.traced.graph_module), x, rtol=0.0)
    assert all(g.prunable for g in analysis.groups if any(m.target.startswith(("c3.", "c5.")) for m in g.members)
               and not any(m.target.startswith("head.") for m in g.members))
    _compress_exact(model, x)
    _assert_unchanged(model, before)
    # every prunable group to half (on a copy: the check runs the model, which runs its hooks)
    analysis, slim = prune_and_check(_copy(model), x, seed=1)
    assert slim.c3.weight.shape == (4, 4, 3, 3) and slim.c5.weight.shape == (3, 4, 1, 1)
    if "parametrize" in kind:  # the parametrization stays on the slim model, resized
        assert parametrize.is_parametrized(slim.c3 if "dim_none" not in kind else slim.c5)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", sorted(_REFUSED))
def test_unsliceable_reparametrizations_are_refused_and_the_model_is_unchanged(kind, train):
    apply, fix = _REFUSED[kind]
    model = _reparametrized(apply, train=train)
    before = _snapshot(model)
    x = torch.randn(X)
    with pytest.raises(ConfigError) as info:
        fxprune.compress(model, method="l1", example_inputs=x, flops=0.5)
    message = str(info.value)
    assert "'c3'" in message and fix in message and "ignore=['c3']" in message
    _assert_unchanged(model, before)
    slim = _compress_exact(model, x, flops=0.95, ignore=["c3"])  # the remedy the message gives works
    _assert_unchanged(model, before)
    assert slim.c3.weight.shape == (8, 8, 3, 3)


def test_refused_module_whose_channels_stay_anyway_is_no_error():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Head().eval()
    parametrizations.spectral_norm(model.a)  # reads the model input: its in channels stay
    parametrizations.orthogonal(model.b)  # produces the output: its out channels stay
    before = _snapshot(model)
    with pytest.raises(ConfigError):  # a's out channels and b's in channels form a prunable group
        fxprune.analyze(model, torch.randn(X))
    analysis = fxprune.analyze(model, torch.randn(X), ignore=["a"])
    assert not analysis.channels.prunable_groups
    _assert_unchanged(model, before)


def test_hooks_that_assign_attributes_leave_the_model_unchanged():
    """A pre-hook that stores a computed tensor, on a leaf (run on meta tensors by shape
    propagation) and on a traced-through module (run on proxies by the tracer)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.gain = nn.Parameter(torch.ones(8, 1, 1))
            self.scale = self.gain * 2

        def forward(self, x):
            return self.conv(x) * self.scale

    def leaf_hook(module, args):
        module.last_input = args[0].detach()
        module.calls = getattr(module, "calls", 0) + 1

    def block_hook(module, args):
        module.scale = module.gain * 2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Scaled(), nn.Conv2d(8, 4, 1)).eval()
    model[0].register_forward_pre_hook(leaf_hook)
    model[1].register_forward_pre_hook(block_hook)
    before = _snapshot(model)
    keys = {name: set(vars(m)) for name, m in model.named_modules()}
    fxprune.analyze(model, torch.randn(X))
    _assert_unchanged(model, before)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == keys
    assert isinstance(model[1].scale, torch.Tensor) and model[1].scale.device.type == "cpu"


def test_tensor_constants_go_to_the_graph_module_not_the_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            offset = torch.linspace(0.0, 1.0, 8).view(1, 8, 1, 1)  # a tensor made while tracing
            return self.b(torch.relu(self.a(x)) + offset)

    torch.manual_seed(0)
    model = Net().eval()
    before = _snapshot(model)
    keys = set(vars(model))
    analysis = fxprune.analyze(model, torch.randn(X))
    assert set(vars(model)) == keys and not hasattr(model, "_tensor_constant0")
    assert hasattr(analysis.traced.graph_module, "_tensor_constant0")
    _assert_unchanged(model, before)
    _compress_exact(model, torch.randn(X), flops=0.9)


class _Kinds(nn.Module):
    """conv, BN, depthwise, transposed conv, 1x1, linear layers: every layer kind the rewrite slices."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.t = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.c1, self.fc, self.fc2 = nn.Conv2d(8, 8, 1), nn.Linear(8, 16), nn.Linear(16, 5)

    def forward(self, x):
        y = self.c1(self.t(torch.relu(self.dw(torch.relu(self.bn(self.c0(x)))))))
        return self.fc2(torch.relu(self.fc(y.mean((2, 3)))))


@pytest.mark.parametrize("kind", ["parametrize_weight_norm", "legacy_weight_norm", "prune_global"])
def test_reparametrizations_on_every_layer_kind(kind):
    torch.manual_seed(0)
    model = _Kinds().eval()
    layers = (model.c0, model.dw, model.t, model.c1, model.fc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "parametrize_weight_norm":  # the transposed conv's norm runs over its input channels:
            for m in layers:  # masking one zeroes a whole normalised slice (g = 0, no NaN)
                parametrizations.weight_norm(m)
        elif kind == "legacy_weight_norm":
            for m in layers:
                nn.utils.weight_norm(m)
        else:
            prune.global_unstructured([(m, "weight") for m in (*layers, model.bn)], prune.L1Unstructured, amount=0.4)
    before = _snapshot(model)
    x = torch.randn(X)
    slim = _compress_exact(model, x)
    _assert_unchanged(model, before)
    assert torch.isfinite(slim(x)).all()
    prune_and_check(_copy(model), x, seed=1)


class _StochasticResidual(nn.Module):
    """A residual block whose branch goes through a random drop of torchvision.ops: StochasticDepth
    (ConvNeXt, EfficientNet) on the branch's output, or DropBlock2d inside the branch."""

    def __init__(self, kind: str):
        super().__init__()
        import torchvision

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        inner = torchvision.ops.DropBlock2d(0.5, 3) if kind == "drop_block" else nn.Identity()
        self.branch = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), inner, nn.Conv2d(16, 8, 1))
        self.drop = torchvision.ops.StochasticDepth(0.5, "row") if kind == "stochastic_depth" else nn.Identity()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop(self.branch(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("kind", ["stochastic_depth", "drop_block"])
@pytest.mark.parametrize("train", [True, False])
def test_stochastic_depth_reads_the_mode_it_runs_in(train, kind):
    """torchvision's StochasticDepth passes ``self.training`` to a function as a bool: traced through,
    a train-mode model's slim copy kept dropping branches in eval mode (verification failed at random;
    with verify=False two eval calls differed). Traced as a leaf it reads its flag when it runs:
    from either mode, the slim model (its branch pruned: MACs fell) is deterministic and equal to the
    masked original in eval mode (verified, 1e-4 relative), and drops branches in train mode.
    torchvision's DropBlock2d passes its flag the same way, and is a leaf too (the branch's channels
    stay prunable through it)."""
    torch.manual_seed(0)
    model = _StochasticResidual(kind).train(train)
    x = torch.randn(8, 3, 6, 6)
    slim = fxprune.compress(model, "l1", x, 0.6)
    assert slim.fxprune_report.macs_after < slim.fxprune_report.macs_before
    slim.eval()
    with torch.no_grad():
        assert torch.equal(slim(x), slim(x))
    drop = "drop" if kind == "stochastic_depth" else "branch.3"
    assert [n.op for n in slim.graph.nodes if str(n.target) == drop] == ["call_module"]
    slim.train()
    torch.manual_seed(1)
    with torch.no_grad():
        outs = [slim(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # p = 0.5 on 8 rows: branches dropped
    assert model.training is train  # the user's model is untouched
