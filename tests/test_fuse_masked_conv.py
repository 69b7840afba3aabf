"""fuse_masked_convs: each documented pattern is fused and keeps the function and the gradients (float64),
the Gate Decorator graph trains the same through it, FLOPs of the fused graph equal the slim model's,
the patterns that must not be fused are left alone, compiled and exported fused graphs agree, and the
Gate Decorator option gives the same result."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from fxprune.passes.fuse_masked_conv import META, fuse_masked_convs
from fxprune.passes.gates import fold_gates, insert_gates
from fxprune.passes.plan import PruningPlan
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.methods.gate_decorator.method import _mask_units

from .handler_models import Depthwise, Residual, ResidualClassifier
from .test_kernels import mask_reads_fixture  # noqa: F401 (the fixture mask_reads)

OP = torch.ops.fxprune.masked_conv2d.default


class ConvScale(nn.Module):
    """conv -> ReLU-free mask multiply, in the forms the passes produce."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.next = nn.Conv2d(6, 4, 1)
        live = torch.tensor([1.0, 0, 1, 1, 0, 1])
        self.gate = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.register_buffer("mask", live.reshape(1, 6, 1, 1))
        self.vec_gate = nn.Parameter(torch.rand(6) + 0.5)
        self.register_buffer("vec_mask", live.clone())
        self.unit = nn.Parameter(torch.tensor([0.7, 0.0, 1.3]))  # GAL: one value per unit, gathered
        self.register_buffer("index", torch.tensor([0, 1, 2, 2, 1, 0]))
        self.scalar = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        y, f = self.conv(x), self.form
        if f == "param":
            y = y * self.gate
        elif f == "left":
            y = self.gate * y
        elif f == "method":
            y = y.mul(self.gate * self.mask)
        elif f == "product_view":
            y = y * (self.vec_gate * self.vec_mask).view(1, -1, 1, 1)
        elif f == "gal":
            y = y * torch.reshape(torch.index_select(self.unit, 0, self.index), (1, 6, 1, 1))
        elif f == "scalar":
            y = y * self.scalar
        return self.next(F.relu(y))


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _run(model, x, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    y = model(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    (y * probe).sum().backward()  # linear in y: zero outputs still pass gradient
    return y.detach(), _grads(model)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("form", ["param", "left", "method", "product_view", "gal", "scalar"])
def test_scale_pattern_keeps_function_and_gradients(form, mode):
    torch.manual_seed(0)
    model = ConvScale(form).double()
    with torch.no_grad():
        model.gate[0, 1] = 0.0  # a zero entry in the trainable factor
    gm = fx.symbolic_trace(model)
    fused = fuse_masked_convs(gm, mode=mode)
    records = fused.meta[META]
    assert [r["pattern"] for r in records][:1] == ["scale"] and records[0]["conv"] == "conv"
    assert not any(n.op == "call_module" and n.target == "conv" for n in fused.graph.nodes)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y0, g0 = _run(gm, x)
    y1, g1 = _run(fused, x)
    assert torch.allclose(y0, y1, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-10, atol=1e-12), k
    # the pruned conv rows get exactly zero gradient
    dead = [1] if form in ("param", "left") else [1, 4]
    if form != "scalar":
        assert torch.equal(g1["conv.weight"][dead], torch.zeros_like(g1["conv.weight"][dead]))


def test_hard_mode_gives_no_gradient_to_zero_entries_before_a_linear_consumer():
    """Without a ReLU after the mask the exact gradient of a zero entry is non-zero: soft keeps it."""

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.gate = nn.Parameter(torch.tensor([1.0, 0.0, 2.0, 0.5]).reshape(1, 4, 1, 1))

        def forward(self, x):
            return (self.conv(x) * self.gate).sum((2, 3))

    torch.manual_seed(0)
    model = Linear().double()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _, exact = _run(gm, x)
    _, soft = _run(fuse_masked_convs(gm, mode="soft"), x)
    _, hard = _run(fuse_masked_convs(gm, mode="hard"), x)
    assert exact["gate"][0, 1].abs() > 0
    assert torch.allclose(soft["gate"], exact["gate"])
    assert hard["gate"][0, 1] == 0 and torch.allclose(hard["gate"][0, [0, 2, 3]], exact["gate"][0, [0, 2, 3]])


def _gated(model, x, seed=0, density=0.5):
    a = fxprune.analyze(model, x)
    gated = insert_gates(a.channels)
    rng = np.random.default_rng(seed)
    keep = {g.index: np.sort(rng.choice(g.n_units, max(1, int(g.n_units * density)), replace=False))
            for g in a.channels.prunable_groups}
    with torch.no_grad():
        for p in gated.gates():
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) + 0.5)
    _mask_units(a.channels, gated, keep)
    return a, gated, keep


@pytest.mark.parametrize("model_cls", [Residual, Depthwise])
def test_gate_decorator_graph_trains_the_same(model_cls):
    torch.manual_seed(0)
    model = model_cls().double().train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    a, gated, _ = _gated(model, x[:2])
    plain = copy.deepcopy(gated.module)  # its own BN statistics
    fused = fuse_masked_convs(gated.module, mode="hard")
    records = fused.meta[META]
    assert {r["pattern"] for r in records} <= {"after_norm", "input_only"}
    assert sum(r["pattern"] == "after_norm" for r in records) == len(gated.sites)
    assert any(r["in_mask"] for r in records)
    for train in (True, False):
        plain.train(train), fused.train(train)
        y0, g0 = _run(plain, x)
        y1, g1 = _run(fused, x)
        assert torch.allclose(y0, y1, rtol=1e-10, atol=1e-12)
        scale = max(g.abs().max() for g in g0.values())
        for k in g0:
            assert torch.allclose(g0[k], g1[k], rtol=0, atol=1e-10 * scale), k
    for name, bn in fused.named_modules():  # an all-zero channel keeps finite batch statistics
        if isinstance(bn, nn.BatchNorm2d):
            assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all(), name


@pytest.mark.parametrize("model_cls", [Residual, Depthwise])
def test_remembered_live_sets_are_handed_to_every_op_and_follow_in_place_mask_updates(model_cls, mask_reads):
    """`cache_live=True` without compact regions: every masked op gets its masks' live indices from a
    `LiveChannels` (kwargs out_live, and in_live where it has an input mask), so no op reads a
    mask while the masks keep their versions; outputs and gradients equal the graph whose ops read
    their masks (float64, 1e-10), before and after in-place updates of the masks (``copy_``): a
    Tick-like removal, then a revival of dead units (a stale live set would skip a revived channel)."""
    from fxprune.passes.compact_chain import LiveChannels

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    _, gated, _ = _gated(model_cls().double().train(), x[:2])
    reading = fuse_masked_convs(copy.deepcopy(gated.module), mode="hard")
    cached = fuse_masked_convs(copy.deepcopy(gated.module), mode="hard", cache_live=True)
    ops_nodes = [n for n in cached.graph.nodes if n.target is OP]
    assert len(ops_nodes) == len(cached.meta[META]) > 0
    for n in ops_nodes:
        for kwarg, mask in (("out_live", n.args[3]), ("in_live", n.kwargs["in_mask"])):
            given = n.kwargs.get(kwarg)
            assert (given is None) == (mask is None), (n, kwarg)
            if given is not None:
                assert isinstance(cached.get_submodule(given.target), LiveChannels)
    reads = mask_reads
    for step in range(4):
        for module in (reading, cached):  # written in place on both copies
            for name, buf in module.named_buffers():
                if name.startswith("fxprune_mask_") and step >= 2:
                    new = buf.clone().reshape(-1)
                    if step == 2:  # a Tick: one more unit of every mask goes
                        new[new.nonzero()[0]] = 0
                    else:  # every dead unit comes back
                        new.fill_(1)
                    buf.copy_(new.reshape(buf.shape))
        y0, g0 = _run(reading, x)
        n_reads = len(reads)
        y1, g1 = _run(cached, x)
        assert len(reads) == n_reads  # the cached graph's ops read no mask
        assert torch.allclose(y0, y1, rtol=1e-10, atol=1e-12)
        scale = max(g.abs().max() for g in g0.values())
        assert g0.keys() == g1.keys()
        for k in g0:
            assert torch.allclose(g0[k], g1[k], rtol=0, atol=1e-10 * scale), k
    assert reads  # the graph without cache_live does read its masks


@pytest.mark.parametrize("model_cls", [Residual, Depthwise])
def test_fused_flops_predict_the_slim_model(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(2, 3, 8, 8)
    a, gated, keep = _gated(model, x)
    fused = fuse_masked_convs(gated.module, mode="hard")

    def conv_flops(m):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x)
        counts = counter.get_flop_counts()["Global"]
        return sum(v for k, v in counts.items() if "conv" in str(k))

    predicted = conv_flops(fused)
    fold_gates(a.channels, gated)
    slim, check = fxprune.prune_with_plan(a, PruningPlan(keep=keep))
    assert check.passed
    assert predicted == conv_flops(slim) < conv_flops(model)


class _Cases(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        conv_cls = _OwnForward if case == "subclass" else nn.Conv2d
        self.conv = conv_cls(3, 4, 3, padding=1, padding_mode="reflect" if case == "reflect" else "zeros")
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Parameter(torch.tensor([1.0, 0.0, 0.5, 2.0]).reshape(1, 4, 1, 1))
        self.vec = nn.Parameter(torch.rand(4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        c = self.case
        y = self.conv(x)
        if c == "trainable_after_bn":  # GAL: soft mask after a train-mode BN
            return self.bn(y) * self.gate
        if c == "two_users":
            return y * self.gate + y
        if c == "squeeze_excite":
            return y * torch.sigmoid(self.fc(y.mean((2, 3))))[:, :, None, None]
        if c == "dtype":
            return y * self.gate.double()
        if c == "last_dim":  # a [C] vector broadcasts along W, not per channel
            return y * self.vec
        return y * self.gate


class _OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("case", ["trainable_after_bn", "two_users", "squeeze_excite", "dtype", "last_dim",
                                  "reflect", "subclass"])
def test_patterns_that_must_not_be_fused(case):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Cases(case))
    fused = fuse_masked_convs(gm, mode="hard")
    assert fused.meta[META] == []
    assert not any(n.target is OP for n in fused.graph.nodes)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(fused(x), gm(x))


def test_a_frozen_mask_after_batchnorm_is_a_constant_factor():
    """GAL freezes its masks (requires_grad False) for fine-tuning: then they fuse like buffers."""
    torch.manual_seed(0)
    model = _Cases("trainable_after_bn").double()
    model.gate.requires_grad_(False)
    gm = fx.symbolic_trace(model)
    fused = fuse_masked_convs(gm, mode="soft")
    assert [r["pattern"] for r in fused.meta[META]] == ["after_norm"]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y0, g0 = _run(copy.deepcopy(gm), x)
    y1, g1 = _run(fused, x)
    assert torch.allclose(y0, y1, rtol=1e-12, atol=1e-12)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-10, atol=1e-12), k
    assert torch.equal(g1["conv.weight"][1], torch.zeros_like(g1["conv.weight"][1]))


def test_bad_arguments_and_the_input_is_untouched():
    gm = fx.symbolic_trace(ConvScale("param"))
    code, training = gm.code, gm.training
    with pytest.raises(fxprune.ConfigError, match="unknown mode"):
        fuse_masked_convs(gm, mode="sometimes")
    with pytest.raises(fxprune.InputError, match="GraphModule"):
        fuse_masked_convs(ConvScale("param"), mode="hard")
    gm.eval()
    fused = fuse_masked_convs(gm, mode="hard")
    assert gm.code == code and fused.code != code and training
    assert not fused.training and fused.conv is gm.conv and fused.gate is gm.gate  # shared, not copied


def _fused_residual():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    _, gated, _ = _gated(Residual().eval(), x)
    return fuse_masked_convs(gated.module, mode="hard"), gated.module(x), x


def test_compiled_and_exported_fused_graph_agree():
    fused, expected, x = _fused_residual()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), expected, atol=1e-6)
    exported = torch.export.export(fused, (x,))
    assert sum(n.target is OP for n in exported.graph.nodes) == len(fused.meta[META])
    assert torch.allclose(exported.module()(x), expected, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_fused_graph_agrees():
    fused, expected, x = _fused_residual()
    assert torch.allclose(torch.compile(fused)(x), expected, atol=1e-5)


_Head = ResidualClassifier


@pytest.mark.parametrize("schedule", ["one_shot", "tick_only"])
def test_gate_decorator_with_fused_kernels_gives_the_same_model(schedule):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)),
                      batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = _Head().eval()
    x = torch.randn(2, 3, 8, 8)
    slims = []
    for fused in (False, True):
        opts = dict(schedule=schedule, p=0.2, tock_epochs=1, finetune_epochs=1, fused_kernels=fused)
        slims.append(fxprune.compress(model, "gate_decorator", x, 0.6, data=data, options=opts))
    plain, fused = slims
    assert plain.fxprune_report.macs_after == fused.fxprune_report.macs_after <= 0.6 * plain.fxprune_report.macs_before
    assert [p.shape for p in plain.parameters()] == [p.shape for p in fused.parameters()]
    probe = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        a, b = plain(probe), fused(probe)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * a.abs().max())


def test_gate_decorator_fill_revives_earlier_units_identically_fused_and_plain(monkeypatch):
    """At the end of the Ticks, units of earlier Ticks fill the slack the last Tick leaves
    (`_fill_slack`); their BatchNorm statistics are reset, so fused and plain runs still agree."""
    import fxprune.methods.gate_decorator.method as gd

    revived, real = [], gd._fill_slack

    def counting(channels, gated, keep, scores, fits):
        out = real(channels, gated, keep, scores, fits)
        revived.append(sum(len(out[g]) - len(keep[g]) for g in keep))
        assert fits(out) and all(set(keep[g]) <= set(out[g]) for g in keep)
        return out

    monkeypatch.setattr(gd, "_fill_slack", counting)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)),
                      batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.randn(2, 3, 8, 8)
    slims = [fxprune.compress(model, "gate_decorator", x, 0.15, data=data,
                              options=dict(schedule="tick_only", p=0.3, finetune_epochs=1, fused_kernels=fused))
             for fused in (False, True)]
    assert revived[0] == revived[1] > 0
    report = slims[0].fxprune_report
    assert 0.14 <= report.macs_after / report.macs_before <= 0.15
    with torch.no_grad():
        a, b = slims[0](x), slims[1](x)
    assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * a.abs().max())
