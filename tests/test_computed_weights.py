"""Convs whose weight is computed in forward from a parameter (weight standardisation) are followed:
their output channels stay prunable, their input channels stay (the standardisation's statistics run
over them). Structural check: slim output == masked original on random inputs (relative tolerance
1e-5, float32), no boundary, MACs counted by FlopCounterMode fell and equal the cost model's recount,
params fell; a weight computed from the input stays a boundary; non-finite values fail."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.passes.mask import masked_reference
from fxprune.passes.plan import resolve
from fxprune.verify import compare

from .conftest import assert_close_outputs, measured_macs, n_params, random_plan


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardised per filter with F.batch_norm."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """Standardised by hand (mean/std over each filter) with a learnt gain per filter."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w * self.gain, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self, conv=StdConv2d):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.std = conv(16, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.std(torch.relu(self.stem(x))))))


class Dynamic(nn.Module):
    """A weight computed from the input (a dynamic conv): not followed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(F.conv2d(y, self.w * x.mean(), None))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("conv", [StdConv2d, ScaledStdConv2d])
def test_standardised_conv_outputs_pruned(conv, seed):
    torch.manual_seed(seed)
    model = Net(conv).eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, x)
    assert analysis.boundaries == [], [b.reason for b in analysis.boundaries]
    out = next(g for g in analysis.groups if any(m.target == "std.weight" and m.dim == 0 for m in g.members))
    stem = next(g for g in analysis.groups if any(m.target == "stem.weight" and m.dim == 0 for m in g.members))
    assert out.prunable and not stem.prunable and "computed from std.weight" in stem.reason
    plan = random_plan(analysis, seed)
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    assert_close_outputs(masked_reference(analysis.channels, plan), slim, x, rtol=1e-5)
    macs = measured_macs(slim, x)
    assert macs < measured_macs(model, x) and n_params(slim) < n_params(model)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    assert slim.get_parameter("std.weight").shape[0] == len(plan.keep[out.index])


def test_compress_standardised():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    slim = fxprune.compress(model, "l1", x, flops=0.7)
    assert slim.fxprune_report.macs_after <= 0.7 * slim.fxprune_report.macs_before
    assert slim.fxprune_report.max_rel_error <= 1e-4


def test_weight_from_the_input_stays_a_boundary():
    analysis = fxprune.analyze(Dynamic(), torch.randn(1, 3, 4, 4))
    assert any("computed" in b.reason for b in analysis.boundaries)


def test_non_finite_fails():
    torch.manual_seed(0)
    model = Net(ScaledStdConv2d).eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, x)
    plan = random_plan(analysis)
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    with torch.no_grad():
        slim.get_parameter("std.gain")[0] = float("inf")
    assert not compare(masked_reference(analysis.channels, plan), slim, analysis.inputs).passed
