"""Verification keeps its power on models whose residual branches start at zero.

With the last BN gamma of every residual branch at 0 (ResNet's zero_init_residual) or a layer scale
of 1e-6 (ConvNeXt), the branch contributes nothing to the output, so a rewrite that breaks the
branch would still compare equal. `compress` therefore verifies the rewrite of a copy in which such
tensors hold random normal-size values (the same plan, the same rewrite), says so in the report, and
returns a model with the original values; the user's model is never written to."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxprune
import fxprune.api as api
from fxprune.errors import VerificationError
from fxprune.verify import DEGENERATE_BELOW, sensitive_values


class LayerScaleBlock(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.pw1 = nn.Conv2d(c, 4 * c, 1)
        self.pw2 = nn.Conv2d(4 * c, c, 1)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 1e-6))
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.layer_scale * self.pw2(torch.nn.functional.gelu(self.pw1(self.dw(x))))
        return self.head(x)


def _zero_init_resnet():
    return torchvision.models.resnet18(weights=None, num_classes=10, zero_init_residual=True).eval()


def _corrupting(monkeypatch, module_name: str):
    """Make every rewrite double the weight of `module_name` (a broken rewrite inside a branch)."""
    real = api.apply_plan

    def broken(channels, plan):
        slim = real(channels, plan)
        with torch.no_grad():
            slim.get_submodule(module_name).weight.mul_(2.0)
        return slim

    monkeypatch.setattr(api, "apply_plan", broken)


def test_sensitive_values_finds_only_silencing_tensors():
    model = _zero_init_resnet()
    fresh = sensitive_values(model)
    zero_gammas = {n for n, p in model.named_parameters() if n.endswith("bn2.weight") and bool((p == 0).all())}
    assert zero_gammas and set(fresh) == zero_gammas  # biases (all zero too) are left alone
    for name, value in fresh.items():
        assert value.abs().min() >= 0.5 and len(set(value.tolist())) == len(value)  # distinct per channel
    assert set(sensitive_values(LayerScaleBlock())) == {"layer_scale"}
    assert all(float(p.detach().abs().max()) < DEGENERATE_BELOW for n, p in model.named_parameters() if n in fresh)


@pytest.mark.parametrize("build, inside, x", [
    (_zero_init_resnet, "layer1.0.conv2", torch.randn(1, 3, 64, 64)),
    (LayerScaleBlock, "pw2", torch.randn(1, 3, 16, 16)),
])
def test_broken_branch_rewrite_is_caught(monkeypatch, build, inside, x):
    torch.manual_seed(0)
    model = build()
    before = copy.deepcopy(model.state_dict())
    _corrupting(monkeypatch, inside)
    # without the sensitive copy the broken rewrite passes: the branch outputs exactly 0
    with monkeypatch.context() as m:
        m.setattr(api, "sensitive_values", lambda gm: {})
        blind = fxprune.compress(model, "l1", x, flops=0.6)
        assert blind.fxprune_report.max_rel_error <= 1e-5
    with pytest.raises(VerificationError):
        fxprune.compress(model, "l1", x, flops=0.6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the user's model changed: {k}"


@pytest.mark.parametrize("build, x", [
    (_zero_init_resnet, torch.randn(1, 3, 64, 64)),
    (LayerScaleBlock, torch.randn(1, 3, 16, 16)),
])
def test_correct_rewrite_passes_and_report_says_so(build, x):
    torch.manual_seed(0)
    model = build()
    before = copy.deepcopy(model.state_dict())
    slim = fxprune.compress(model, "l1", x, flops=0.6)
    report = slim.fxprune_report
    assert report.max_rel_error <= 1e-4
    assert "random normal-size values" in report.details["verification"]
    assert report.macs_after < report.macs_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the user's model changed: {k}"
    # the returned model keeps the model's own (zero / tiny) values
    for name, p in slim.named_parameters():
        if name in sensitive_values(model):
            assert float(p.detach().abs().max()) < DEGENERATE_BELOW


def test_prune_with_plan_verifies_sensitively(monkeypatch):
    from .conftest import random_plan

    model = _zero_init_resnet()
    x = torch.randn(1, 3, 64, 64)
    analysis = fxprune.analyze(model, x)
    _corrupting(monkeypatch, "layer2.0.conv2")
    with pytest.raises(VerificationError):
        fxprune.prune_with_plan(analysis, random_plan(analysis))


def test_models_without_degenerate_scales_unchanged():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    assert sensitive_values(model) == {}
    slim = fxprune.compress(model, "l1", torch.randn(1, 3, 64, 64), flops=0.5)
    assert "verification" not in slim.fxprune_report.details
