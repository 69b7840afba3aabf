"""Convs whose filter is a registered buffer (a fixed blur/anti-aliasing filter, not learnt) are
sliced like parameters: slim output == masked original (rel. tol 1e-5, fp32), MACs and params fell,
the buffer shrank with its channels, and the user's model is untouched."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

from .conftest import prune_and_check


def _blur(c: int) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    return (k[:, None] * k[None, :] / 16).expand(c, 1, 3, 3).clone()


class BlurModule(nn.Module):
    """A depthwise nn.Conv2d whose weight was replaced by a buffer (anti-aliased downsampling)."""

    def __init__(self, persistent: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.blur = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        del self.blur.weight
        self.blur.register_buffer("weight", _blur(16), persistent=persistent)
        self.c2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.blur(torch.relu(self.c1(x))))


class BlurFunctional(nn.Module):
    """F.conv2d on a registered buffer, depthwise (groups=16) and dense (groups=1)."""

    def __init__(self, groups: int = 16):
        super().__init__()
        self.groups = groups
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.register_buffer("filt", _blur(16) if groups == 16 else torch.randn(16, 16, 3, 3) / 12)
        self.c2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = F.conv2d(torch.relu(self.c1(x)), self.filt, None, 1, 1, 1, self.groups)
        return self.c2(y)


@pytest.mark.parametrize("build", [BlurModule, lambda: BlurModule(persistent=False),
                                   BlurFunctional, lambda: BlurFunctional(groups=1)],
                         ids=["module", "module-nonpersistent", "functional-depthwise", "functional-dense"])
def test_buffer_filter_is_sliced(build):
    torch.manual_seed(0)
    model = build().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    analysis, slim = prune_and_check(model, x)
    assert analysis.boundaries == []
    buffers = dict(slim.named_buffers())
    name = "blur.weight" if "blur.weight" in buffers else "filt"
    assert buffers[name].shape[0] < 16
    assert not isinstance(buffers[name], nn.Parameter)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the user's model changed: {k}"


def test_buffer_filter_compress_verifies():
    torch.manual_seed(0)
    model = BlurFunctional().eval()
    slim = fxprune.compress(model, "l1", torch.randn(1, 3, 16, 16), flops=0.5)
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before
    assert report.max_rel_error <= 1e-5


def test_non_finite_output_still_fails():
    """The verification of such a model still catches a slim output that differs (a NaN in one)."""
    from fxprune.passes.mask import masked_reference
    from fxprune.verify import compare

    from .conftest import random_plan

    torch.manual_seed(0)
    model = BlurModule().eval()
    x = torch.randn(1, 3, 16, 16)
    analysis = fxprune.analyze(model, x)
    plan = random_plan(analysis)
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    with torch.no_grad():
        slim.c2.bias[0] = float("nan")
    result = compare(masked_reference(analysis.channels, plan), slim, analysis.inputs)
    assert not result.passed
