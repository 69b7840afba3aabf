"""Structured reshapes: a channel dim split into (g, w) (channel shuffle, split attention, unflatten)
keeps its channels prunable with the same kept positions in every block; transposes, softmax and
sum over the group axis, and merging back map them exactly, and the rewrite fixes the reshape sizes.

Structural check per model: a random keep-set gives a slim model whose output equals the masked
original's on random inputs (relative tolerance 1e-5, float32), no boundary is left, MACs (counted by
FlopCounterMode) and parameters fell; non-finite values fail the comparison."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune
from fxprune.api import with_grouped
from fxprune.passes.mask import masked_reference
from fxprune.verify import compare

from .conftest import prune_and_check
from .structured_models import Shuffle, SplitAttnNet, Unflattens

MODELS = {
    "shuffle": (Shuffle, (2, 3, 8, 8)),
    "shuffle-literal": (lambda: Shuffle(literal=True), (2, 3, 8, 8)),
    "split-attention": (SplitAttnNet, (2, 3, 8, 8)),
    "unflatten-method": (Unflattens, (2, 3, 6, 6)),
    "unflatten-module": (lambda: Unflattens(module=True), (2, 3, 6, 6)),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10), (1, 3, 64, 64)),
}


def _check(model, x, grouped="whole", seed=0):
    return prune_and_check(model, x, seed, grouped=grouped, return_plan=True)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_structured_slim_equals_masked(name, seed):
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.randn(shape)
    grouped = "equal" if name == "split-attention" else "whole"
    analysis, slim, _ = _check(model, x, grouped, seed)
    assert analysis.boundaries == [], [b.reason for b in analysis.boundaries]


def test_shuffle_keeps_the_same_positions_in_every_block():
    torch.manual_seed(0)
    model = Shuffle(literal=True).eval()
    analysis, slim, plan = _check(model, torch.randn(2, 3, 8, 8))
    g = next(g for g in analysis.groups if any(m.target == "a.weight" and m.dim == 0 for m in g.members))
    assert g.prunable and g.n_units == 8  # 3 blocks of 8: unit b = position b of every block
    view = next(n for n in slim.graph.nodes if n.target == "view")
    kept = len(plan.keep[g.index])
    assert tuple(view.args[2:4]) == (3, kept)  # the split sizes were fixed: 3 groups of the kept width
    assert slim.a.out_channels == 3 * kept


def test_split_attention_needs_equal_groups():
    """Whole groups of the radix conv and per-position radix coupling leave one unit; equal positions
    per group prune the attention's channels."""
    torch.manual_seed(0)
    model = SplitAttnNet().eval()
    x = torch.randn(2, 3, 8, 8)
    whole = fxprune.analyze(model, x)
    equal = with_grouped(fxprune.analyze(model, x), "equal")

    def units(analysis):
        return next(g for g in analysis.groups
                    if any(m.target == "blocks.0.attn.fc2.weight" and m.dim == 0 for m in g.members)).n_units

    assert units(whole) == 1 and units(equal) > 1
    slim = fxprune.compress(model, "l1", x, flops=0.5, grouped="equal")
    assert slim.fxprune_report.macs_after <= 0.5 * slim.fxprune_report.macs_before
    assert slim.fxprune_report.max_rel_error <= 1e-4


def test_shufflenet_reaches_half_flops_without_boundaries():
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x1_0(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    slim = fxprune.compress(model, "l1", x, flops=0.5)
    report = slim.fxprune_report
    assert report.boundaries == [] and report.macs_after <= 0.5 * report.macs_before
    assert report.max_rel_error <= 1e-4
    # the shuffled (stage-level) channels were pruned, not only the branch-internal convs
    assert slim.get_submodule("stage2.0.branch1.2").out_channels < model.stage2[0].branch1[2].out_channels


def test_split_merging_into_a_neighbour_stays_a_boundary():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 1)
            self.b = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            n, c, h, w = x.shape
            return self.b(self.a(x).reshape(n, 4, 2 * h, w))  # C = 4 x 2, the 2 merged with H

    analysis = fxprune.analyze(Odd(), torch.randn(1, 3, 4, 4))
    assert any("merges part of it" in b.reason for b in analysis.boundaries)


def test_non_finite_fails():
    torch.manual_seed(0)
    model = Shuffle().eval()
    x = torch.randn(2, 3, 8, 8)
    analysis, slim, plan = _check(model, x)
    with torch.no_grad():
        slim.c.bias[1] = float("nan")
    assert not compare(masked_reference(analysis.channels, plan), slim, analysis.inputs).passed


def test_shuffle_of_one_channel_blocks_is_a_boundary_not_a_wrong_view():
    """With g blocks of width 1, `view(n, g, c // g, h, w)` lands C whole in the group dim; pruning
    it would leave the slim `c // g` at 0 (found by the random-CNN property test). The reshape is a
    boundary, and compress keeps the model exact."""
    class OneWide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 2, 1, groups=1)
            self.b = torch.nn.Conv2d(2, 8, 1)
            self.c = torch.nn.Conv2d(8, 3, 1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.size()
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
            return self.c(torch.relu(self.b(y)))

    model, x = OneWide().eval(), torch.randn(2, 3, 4, 4)
    analysis = fxprune.analyze(model, x)
    assert any("from the channel count" in b.reason for b in analysis.boundaries)
    assert not any(m.target == "a.weight" for g in analysis.channels.prunable_groups for m in g.members)
    slim = fxprune.compress(model, "l1", x, flops=0.7)  # only b's channels can go
    assert slim.a.out_channels == 2 and slim.b.out_channels < 8
    assert slim.fxprune_report.max_rel_error <= 1e-5
