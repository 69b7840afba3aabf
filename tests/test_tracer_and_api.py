"""Tracing with automatic leaves, input/output structures, and what compress must preserve."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxprune

from .conftest import assert_close_outputs, measured_macs
from .handler_models import NestedOutputs, Residual, cbr


class _DataDependent(nn.Module):
    """Untraceable: Python control flow on a tensor value."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.conv(x)


class _WithUntraceablePart(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.odd = _DataDependent(8)
        self.c, self.head = cbr(8, 6), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(self.c(self.odd(self.b(self.a(x)))))


def test_untraceable_submodule_becomes_a_leaf_and_its_channels_stay():
    model = _WithUntraceablePart().eval()
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x)
    assert list(a.traced.auto_leaves) == ["odd"]
    assert "control flow" in a.traced.auto_leaves["odd"]
    assert [b.node for b in a.boundaries] == ["odd"]
    assert "untraceable module _DataDependent" in a.boundaries[0].reason
    prunable = {g.leading.target for g in a.channels.prunable_groups}
    assert prunable == {"a.0.weight", "c.0.weight"}  # b's output feeds the leaf: fixed
    slim = fxprune.compress(model, "l1", x, flops=0.8)
    assert slim.fxprune_report.macs_ratio <= 0.8
    assert "odd" in dict(slim.named_children())


def test_user_leaf_modules_and_concrete_args():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Residual()

        def forward(self, x, double: bool = False):
            y = self.net(x)
            return y * 2 if double else y

    x = torch.randn(1, 3, 8, 8)
    a = fxprune.analyze(Flagged(), x, leaf_modules=["net.f"], concrete_args={"double": True})
    assert any(b.node == "net_f" for b in a.boundaries)
    a = fxprune.analyze(Flagged(), x, leaf_modules=[nn.BatchNorm2d], concrete_args={"double": False})
    assert not any("BatchNorm" in b.reason for b in a.boundaries)  # BN is a known leaf handler


def test_keyword_and_tuple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = cbr(3, 8), cbr(3, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x, y=None):
            return self.head(self.a(x) + self.b(y))

    x, y = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    for inputs in ((x, y), {"x": x, "y": y}):
        slim = fxprune.compress(TwoInputs().eval(), "l1", inputs, flops=0.6)
        assert slim.fxprune_report.macs_ratio <= 0.6
        assert slim(x, y=y).shape == (1, 4, 8, 8)


def test_nested_outputs_are_compared_leaf_by_leaf():
    model = NestedOutputs().eval()
    slim = fxprune.compress(model, "l2", torch.randn(2, 3, 8, 8), flops=0.7)
    out = slim(torch.randn(2, 3, 8, 8))
    assert set(out) == {"out", "extra"} and type(out["extra"][0]).__name__ == "Pair"


def test_user_model_untouched_and_mode_dtype_kept():
    model = Residual().double().train()
    model.f[1].eval()  # a mixed-mode model: one frozen BN
    before = copy.deepcopy(model.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    slim = fxprune.compress(model, "l1", x, flops=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert slim.training and not slim.get_submodule("f.1").training
    assert all(p.dtype == torch.float64 for p in slim.parameters())
    assert slim.fxprune_report.max_rel_error <= 1e-9  # float64 tolerance
    assert measured_macs(slim, x) <= 0.5 * measured_macs(model, x)
    # the slim model trains: gradients reach every parameter
    slim(x).sum().backward()
    assert all(p.grad is not None for p in slim.parameters())


def test_inception_train_mode_aux_outputs():
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(init_weights=False, aux_logits=True).train()
    x = torch.randn(2, 3, 299, 299)
    slim = fxprune.compress(model, "l1", x, flops=0.5)
    assert slim.training
    out = slim(x)
    assert type(out).__name__ == "InceptionOutputs" and out.aux_logits.shape == (2, 1000)
    assert slim.fxprune_report.max_rel_error <= 1e-4


def test_compress_is_equivalent_to_masked_original_for_each_method():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 64, 64)
    for method in fxprune.DATA_FREE_METHODS:
        slim = fxprune.compress(model, method, x, flops=0.5)
        r = slim.fxprune_report
        assert r.macs_after <= 0.5 * r.macs_before and r.max_rel_error <= 1e-4, method


def test_verification_catches_a_broken_rewrite(monkeypatch):
    from fxprune.passes.ops import conv

    original = conv.ConvModule.rewrite

    def broken(self, rctx, node):
        original(self, rctx, node)
        mod = rctx.gm.get_submodule(node.target)
        with torch.no_grad():
            mod.weight.mul_(1.01)  # a silent numeric error

    monkeypatch.setattr(conv.ConvModule, "rewrite", broken)
    with pytest.raises(fxprune.VerificationError, match="error relative to the output's magnitude"):
        fxprune.compress(Residual().eval(), "l1", torch.randn(1, 3, 8, 8), 0.5)
    slim = fxprune.compress(Residual().eval(), "l1", torch.randn(1, 3, 8, 8), 0.5, verify=False)
    assert slim.fxprune_report.max_abs_error is None


def test_masked_original_matches_for_explicit_plan():
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x)
    from fxprune.passes.mask import masked_reference
    from fxprune.passes.plan import PruningPlan

    g = a.channels.prunable_groups[0]
    plan = PruningPlan(keep={g.index: [0]})
    slim, result = fxprune.prune_with_plan(a, plan)
    assert result.passed
    assert_close_outputs(masked_reference(a.channels, plan), slim, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_keep_their_dtype(dtype):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(dtype).eval()
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    slim = fxprune.compress(model, "l1", x, 0.5)
    assert {p.dtype for p in slim.parameters()} == {dtype}
    assert slim.fxprune_report.max_rel_error <= (5e-2 if dtype is torch.bfloat16 else 2e-2)
    assert slim(x).dtype == dtype


def test_tensor_attribute_access_is_a_boundary():
    class UsesT(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(6, 8), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.a(x).T)  # (8, 4) -> features of a become rows

    a = fxprune.analyze(UsesT(), torch.randn(4, 6))
    assert [b.reason for b in a.boundaries] == ["tensor attribute .T"]
    assert not any(g.leading.target == "a.weight" and g.prunable for g in a.groups)


def test_shape_propagation_falls_back_to_real_tensors_for_data_dependent_ops():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = cbr(3, 8), cbr(8, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.b(self.a(x))
            scale = y.abs().amax((2, 3)).sum(0).max().item()  # meta/fake tensors cannot give a value
            return self.head(y) / (1.0 + scale)

    model = DataDependent().train()
    before = copy.deepcopy(model.state_dict())
    a = fxprune.analyze(model, torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert any(".item()" in b.reason for b in a.boundaries)
    assert a.cost.total_macs > 0
    assert [g.leading.target for g in a.channels.prunable_groups] == ["a.0.weight"]


def test_registered_leaf_module_is_kept_whole():
    from fxprune.passes import tracer

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.op, self.b, self.head = cbr(3, 8), Opaque(), cbr(8, 6), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(self.b(self.op(self.a(x))))

    fxprune.register_leaf_module(Opaque, "custom kernel")
    try:
        a = fxprune.analyze(Net(), torch.randn(1, 3, 8, 8))
    finally:
        del tracer._LEAF_REGISTRY[Opaque]
    assert [b.node for b in a.boundaries] == ["op"]
    assert [g.leading.target for g in a.channels.prunable_groups] == ["b.0.weight"]
    assert "op.conv" in dict(a.traced.graph_module.named_modules())


def test_slim_models_round_trip_through_torch_save(tmp_path):
    """A slim model is a GraphModule whose graph records fxprune's tracer class; unpickling builds
    that tracer with no arguments to retrace the generated code (it raised a TypeError before). The
    loaded model (a plain one, and one with a leaf attention module and narrowed window attention
    calls) computes exactly what the slim model does."""
    from torchvision.models import swin_transformer as swin

    torch.manual_seed(0)
    tiny_swin = swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                                     num_classes=5).eval()
    for model, x, heads in ((Residual().eval(), torch.randn(2, 3, 8, 8), "whole"),
                            (tiny_swin, torch.randn(1, 3, 32, 32), "width")):
        slim = fxprune.compress(model, "l1", x, flops=0.6, heads=heads)
        torch.save(slim, tmp_path / "slim.pt")
        loaded = torch.load(tmp_path / "slim.pt", weights_only=False)
        assert_close_outputs(slim, loaded, x, rtol=0.0)
