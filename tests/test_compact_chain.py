"""Compact chains and regions (`passes.compact_chain`, pattern "compact" of
`fuse_masked_convs(..., compact=True)`): the channels that a constant mask factor kills are never
materialised, between two convs and along residual streams.

Every check is against the unfused gated graph in float64 (outputs and every parameter gradient to
1e-10 relative, train and eval), on ResNet-20 (every conv: the block-inner channels and the
residual streams, whose adds run compact), VGG-BN (a chain: its middle convs read and write compact
tensors) and a stream whose producers keep different channels."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.methods.gate_decorator.method import _mask_units
from fxprune.nets import NETS, resnet20, vgg_bn
from fxprune.passes.gal_masks import insert_soft_masks
from fxprune.passes.fuse_masked_conv import META, fuse_masked_convs

from .test_fuse_masked_conv import _gated as gated_at_density


def _gated(build, density=0.5, seed=0):
    """ResNet-20 / VGG-BN in float64, gated, random masks at `density` (`test_fuse_masked_conv._gated`)."""
    torch.manual_seed(seed)
    model = build().double().train()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    a, gated, _ = gated_at_density(model, x[:2], seed=seed, density=density)
    return a, gated, x


def _step(module, x):
    module.zero_grad(set_to_none=True)
    y = module(x)
    (y.square().sum() + y.sum()).backward()
    return y.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _same(plain, compact, x):
    y0, g0 = _step(plain, x)
    y1, g1 = _step(compact, x)
    assert torch.isfinite(y1).all()
    assert torch.allclose(y0, y1, rtol=1e-10, atol=1e-12 * y0.abs().max())
    assert g0.keys() == g1.keys()
    scale = max(g.abs().max() for g in g0.values())
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=0, atol=1e-10 * scale), k


# ResNet-20: 21 convs (stem, 18 in blocks, 2 shortcuts), every one a producer, all but the stem
# reading a compact tensor; its head (pool -> flatten -> fc) reads the stream through one expansion
@pytest.mark.parametrize("build, producers, middles, expansions", [(resnet20, 21, 20, 1), (vgg_bn, 3, 2, 0)])
def test_compact_chains_train_the_same(build, producers, middles, expansions):
    _, gated, x = _gated(build)
    plain = copy.deepcopy(gated.module)  # its own parameters and statistics
    compact = fuse_masked_convs(gated.module, mode="hard", compact=True)
    records = [r for r in compact.meta[META] if r["pattern"] == "compact"]
    assert sum(r["out_compact"] for r in records) == producers
    assert sum(r["out_compact"] and r["in_mask"] for r in records) == middles
    assert all(r["in_mask"] for r in records if not r["out_compact"])  # every chain ends in a consumer
    assert sum(r["pattern"] == "compact_expand" for r in compact.meta[META]) == expansions
    stats_before = {n: b.clone() for n, b in gated.module.named_buffers() if "running" in n}
    for train in (True, False):
        plain.train(train), compact.train(train)
        _same(plain, compact, x)
    # BatchNorm statistics: live channels updated as the plain graph did, dead ones left alone
    plain_buffers = dict(plain.named_buffers())
    compact_norms = {r["norm"] for r in records if r["norm"]}
    assert len(compact_norms) == producers
    for name in compact_norms:
        bn = gated.module.get_submodule(name)
        assert torch.equal(bn.num_batches_tracked, plain_buffers[f"{name}.num_batches_tracked"]), name
        for stat in ("running_mean", "running_var"):
            now, ref = getattr(bn, stat), plain_buffers[f"{name}.{stat}"]
            moved = now != stats_before[f"{name}.{stat}"]  # the live channels, exactly
            assert torch.allclose(now[moved], ref[moved], rtol=1e-10, atol=1e-12), (name, stat)
            assert 0 < moved.sum() < len(moved), (name, stat)


@pytest.mark.parametrize("cache_live", [False, True])
def test_mask_updates_in_place_are_seen_and_edge_densities_are_exact(cache_live):
    """Gate Decorator's Ticks change the masks in place: the compact graph reads them on every call
    (or, with `cache_live`, whenever their version changed), including a group with every channel
    dead and one with every channel live."""
    a, gated, x = _gated(resnet20)
    plain = copy.deepcopy(gated.module)
    compact = fuse_masked_convs(gated.module, mode="hard", compact=True, cache_live=cache_live)
    groups = [g.index for g in a.channels.prunable_groups]
    for keep in ({g: np.arange(0) if i % 2 else np.arange(a.channels.groups[g].n_units) for i, g in enumerate(groups)},
                 {g: np.arange(a.channels.groups[g].n_units) for g in groups}):
        _mask_units(a.channels, gated, keep)
        plain.load_state_dict(gated.module.state_dict())
        for train in (True, False):
            plain.train(train), compact.train(train)
            _same(plain, compact, x)


class _Chains(nn.Module):
    """conv -> BN -> * mask -> {dropout | depthwise conv} -> conv: neither may run compact (no conv
    reads the masked tensor as it is)."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.register_buffer("mask", torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 0]).reshape(1, 8, 1, 1))

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)) * self.mask)
        if self.case == "dropout":
            return self.c2(torch.nn.functional.dropout(y, 0.5, self.training))
        return self.dw(y)  # "depthwise"


@pytest.mark.parametrize("case", ["dropout", "depthwise"])
def test_chains_that_must_not_be_compacted(case):
    gm = torch.fx.symbolic_trace(_Chains(case).double().eval())
    compact = fuse_masked_convs(gm, mode="hard", compact=True)
    assert not [r for r in compact.meta[META] if r["pattern"] == "compact"]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert torch.allclose(gm(x), compact(x), rtol=1e-10, atol=1e-12)


def test_compact_conv_alone_equals_the_dense_conv_on_its_live_channels():
    """`compact_conv` without a BatchNorm (the scale folded into the filters), with a compact input:
    its output is the dense (conv(x, W) + b) * s on the live output channels, its gradients the
    dense ones on the live input channels, filters and bias entries (float64)."""
    from fxprune.passes.compact_chain import compact_conv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, generator=g)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor([0.5, 0.0, 2.0, 1.5, 0.0], dtype=torch.float64)
    live_in, live_out = torch.tensor([0, 2, 3, 5]), torch.tensor([0, 2, 3])
    xin = x.clone()
    xin[:, [1, 4]] = 0  # what a masked producer hands over
    ref = (torch.nn.functional.conv2d(xin, w, b, 2, 1) * s.reshape(1, -1, 1, 1))[:, live_out]
    (gw_ref, gb_ref) = torch.autograd.grad(ref.square().sum(), (w, b))
    out = compact_conv(x[:, live_in], live_in, live_out, w, b, [2, 2], [1, 1], [1, 1], scale=s)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    gw, gb = torch.autograd.grad(out.square().sum(), (w, b))
    assert torch.allclose(gw, gw_ref, rtol=1e-12, atol=1e-12) and torch.allclose(gb, gb_ref, rtol=1e-12, atol=1e-12)
    assert gw[[1, 4]].abs().sum() == 0 and gw[:, [1, 4]].abs().sum() == 0  # dead filters and input columns


class _Stream(nn.Module):
    """A residual stream whose two producers keep different channels (gate * mask, the gate
    trainable), read by a conv, by a channel sum and by an add with an unmasked tensor."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.gate0, self.gate1 = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5), nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.register_buffer("mask0", torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0]).reshape(1, 8, 1, 1))
        self.register_buffer("mask1", torch.tensor([1.0, 1, 0, 0, 0, 1, 0, 0]).reshape(1, 8, 1, 1))

    def forward(self, x):
        s = torch.relu(self.bn0(self.c0(x)) * (self.gate0 * self.mask0))
        t = torch.relu(self.bn1(self.c1(s)) * (self.gate1 * self.mask1) + s)
        return self.c2(t) + t.sum(1, keepdim=True) + (s + self.c3(x)).mean(1, keepdim=True)


def test_a_stream_runs_compact_on_the_channels_some_producer_keeps():
    """The stream's live channels are the union of its producers' (0, 1, 2, 5): channel 2 lives in
    `s` only, 1 in the block's output only; the readers that need every channel get it expanded."""
    torch.manual_seed(0)
    model = _Stream().double().train()
    gm = torch.fx.symbolic_trace(model)
    plain = copy.deepcopy(gm)
    compact = fuse_masked_convs(gm, mode="hard", compact=True)
    records = compact.meta[META]
    convs = {r["conv"]: r for r in records if r["pattern"] == "compact"}
    assert convs.keys() == {"c0", "c1", "c2"} and convs["c1"]["in_mask"] and convs["c1"]["out_compact"]
    assert sum(r["pattern"] == "compact_expand" for r in records) == 2  # t (channel sum), s (the dense add)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    for train in (True, False):
        plain.train(train), compact.train(train)
        _same(plain, compact, x)
    live = torch.tensor([0, 1, 2, 5])
    for name in ("bn0", "bn1"):  # statistics moved on the region's live channels, exactly as the plain graph's
        now, ref = getattr(compact, name).running_mean, getattr(plain, name).running_mean
        assert torch.allclose(now[live], ref[live], rtol=1e-10, atol=1e-12)
        assert torch.equal(now[[3, 4, 6, 7]], torch.zeros(4, dtype=torch.float64))


class _InvertedResidual(nn.Module):
    """MobileNetV2's block with its own masks: expand (1x1) -> BN -> * (gate * m1) -> ReLU6 ->
    depthwise 3x3 (with bias) -> BN -> * (gate * m2) -> ReLU6 -> project (1x1). m1 and m2 keep
    different channels: 1 only m2 (the depthwise conv reads zeros there and its bias makes it
    non-zero), 2 and 7 only m1 (computed, then zeroed by m2)."""

    def __init__(self, stride: int):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, stride, 1, groups=8), nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 4, 1)
        self.gate1, self.gate2 = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5), nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.register_buffer("m1", torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 1]).reshape(1, 8, 1, 1))
        self.register_buffer("m2", torch.tensor([1.0, 1, 0, 0, 0, 1, 0, 0]).reshape(1, 8, 1, 1))

    def forward(self, x):
        h = nn.functional.relu6(self.bn1(self.expand(x)) * (self.gate1 * self.m1))
        h = nn.functional.relu6(self.bn2(self.dw(h)) * (self.gate2 * self.m2))
        return self.project(h)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_depthwise_producer_joins_its_input_region(stride):
    """The depthwise conv reads and writes the expand conv's region compact (live: the union of
    both masks, channels 0, 1, 2, 5, 7), the project conv reads it: no expansion, and the same
    outputs and gradients as the plain graph in float64, train and eval; then with every channel
    dead and every channel live (the masks written in place)."""
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_InvertedResidual(stride).double().train())
    plain = copy.deepcopy(gm)
    compact = fuse_masked_convs(gm, mode="hard", compact=True)
    convs = {r["conv"]: r for r in compact.meta[META] if r["pattern"] == "compact"}
    assert convs.keys() == {"expand", "dw", "project"}
    assert convs["dw"]["in_mask"] and convs["dw"]["out_compact"] and convs["dw"]["norm"] == "bn2"
    assert convs["project"]["in_mask"] and not convs["project"]["out_compact"]
    assert not [r for r in compact.meta[META] if r["pattern"] == "compact_expand"]
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    for train in (True, False):
        plain.train(train), compact.train(train)
        _same(plain, compact, x)
    for fill in (0.0, 1.0):
        gm.m1.fill_(fill), gm.m2.fill_(fill)
        plain.load_state_dict(gm.state_dict())  # dead channels' running statistics were not updated (by design)
        for train in (True, False):
            plain.train(train), compact.train(train)
            _same(plain, compact, x)


def test_live_sets_are_computed_once_per_mask_version(monkeypatch):
    """`cache_live=True`: each region reads its live channels (``nonzero``, a host synchronisation
    on a GPU) on the first call and again only after a mask changed in place."""
    import fxprune.passes.compact_chain as cc

    calls = []
    real = cc.live_channels
    monkeypatch.setattr(cc, "live_channels", lambda keep: calls.append(1) or real(keep))
    a, gated, x = _gated(resnet20)
    plain = copy.deepcopy(gated.module)
    compact = fuse_masked_convs(gated.module, mode="hard", compact=True, cache_live=True)
    regions = sum(isinstance(m, cc.LiveChannels) for m in compact.modules())
    assert regions == 12  # 9 block-inner groups, 3 streams
    for _ in range(3):
        _same(plain, compact, x)
    assert len(calls) == regions
    groups = [g.index for g in a.channels.prunable_groups]
    keep = {g: np.arange(a.channels.groups[g].n_units)[::2] for g in groups}
    _mask_units(a.channels, gated, keep)  # copy_ into every mask
    plain.load_state_dict(gated.module.state_dict())
    _same(plain, compact, x)
    assert len(calls) == 2 * regions
    gated.module.fxprune_mask_0.zero_()  # one region's mask: only that region reads again
    plain.load_state_dict(gated.module.state_dict())
    _same(plain, compact, x)
    assert len(calls) == 2 * regions + 1


@pytest.mark.parametrize("masks", ["gate_decorator", "gal_frozen"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_every_net_trains_the_same_through_its_compact_regions(net, masks):
    """Every network of `fxprune.nets`, gated as Gate Decorator does (0/1 masks at density 0.5) or
    masked as GAL once its masks froze (channel, block and branch masks: random values, 40 % zero,
    each producer of a stream its own), against the plain graph in float64, train and eval."""
    torch.manual_seed(0)
    model = NETS[net]().double().train()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    if masks == "gate_decorator":
        _, gated, _ = gated_at_density(model, x[:2], seed=0, density=0.5)
        module = gated.module
    else:
        analysis = fxprune.analyze(model, x[:2]).channels
        masked = insert_soft_masks(analysis, ("channel", "block", "branch"), "ones", 0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in masked.params():
                keep = torch.rand(p.shape, generator=g, dtype=p.dtype) < 0.6
                p.copy_(keep * torch.rand(p.shape, generator=g, dtype=p.dtype)).requires_grad_(False)
        module = masked.module
    plain = copy.deepcopy(module)
    compact = fuse_masked_convs(module, mode="hard", compact=True, cache_live=True)
    assert any(r["pattern"] == "compact" for r in compact.meta[META])
    for train in (True, False):
        plain.train(train), compact.train(train)
        _same(plain, compact, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compact_training_step_replays_from_a_cuda_graph_as_it_runs_eagerly():
    """The kernel bench's graphed training steps (`benches/micro/bench_kernels.py`, `_graphed`: the
    issue's GPU training-step measurement) compute what the eager steps compute: Gate Decorator's
    compact region (ResNet-20, half the channels live, forward + backward + SGD) captured in a CUDA
    graph, 3 warm-up steps + 1 checking replay + 3 replays, leaves every parameter where 7 eager
    steps of an identical copy leave it (fp32, rtol 1e-3, atol 1e-5; cuDNN may pick other
    algorithms inside the capture), all finite; the eager-mask step captures too. The same for
    the fused op's step (``cache_live=True`` without compact regions: the op gets its live sets
    handed over and reads no mask, so it captures)."""
    from benches.micro.bench_kernels import _graphed, _step as train_step

    def build(compact: bool):
        torch.manual_seed(0)
        model = resnet20().cuda().train()
        x = torch.randn(16, 1, 28, 28, device="cuda")
        a, gated, _ = gated_at_density(model, x[:2], seed=0, density=0.5)
        fused = fuse_masked_convs(gated.module, mode="hard", compact=compact, cache_live=True)
        y = torch.randint(0, 10, (16,), device="cuda")
        loss = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
        return gated.module, fused, x, loss

    for compact in (True, False):
        plain, fused, x, loss = build(compact)
        eager = train_step(fused, x, loss, [p for p in plain.parameters() if p.requires_grad])
        for _ in range(7):
            eager()
        plain_g, fused_g, x_g, loss_g = build(compact)
        replay = _graphed(train_step(fused_g, x_g, loss_g, [p for p in plain_g.parameters() if p.requires_grad]),
                          "cuda")
        assert callable(replay), (compact, replay)
        for _ in range(3):
            replay()
        torch.cuda.synchronize()
        for (name, p), q in zip(plain.named_parameters(), plain_g.parameters()):
            assert torch.isfinite(q).all(), name
            torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=f"{name} (compact={compact})")
    plain_e, _, x_e, loss_e = build(True)
    assert callable(_graphed(train_step(plain_e, x_e, loss_e, [p for p in plain_e.parameters() if p.requires_grad]),
                             "cuda"))
