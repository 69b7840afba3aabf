"""Selection: exact FLOPs targets, round_to, minimums, uniform ratios, method differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import fxprune
from fxprune.constraints import Constraints
from fxprune.methods import get_method
from fxprune.methods.selection import select

from .conftest import measured_macs


@pytest.fixture(scope="module")
def resnet_analysis():
    torch.manual_seed(0)
    return fxprune.analyze(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))


def _kept_channels(analysis, plan):
    return {gi: len(kept) * analysis.groups[gi].unit_channels for gi, kept in plan.keep.items()}


@pytest.mark.parametrize("flops", [0.9, 0.5, 0.3, 0.12])
def test_target_met_tightly(resnet_analysis, flops):
    a = resnet_analysis
    plan = select(a.channels, a.cost, get_method("l1").criterion.scores(a.channels), Constraints(flops=flops))
    macs = a.cost.macs(a.channels.keep_roots(plan.keep))
    assert macs <= flops * a.cost.total_macs
    # keeping one more unit of the cheapest kind would break the budget: the search is tight
    assert macs >= flops * a.cost.total_macs * 0.99


def test_round_to_keeps_multiples_per_group(resnet_analysis):
    a = resnet_analysis
    plan = select(a.channels, a.cost, get_method("l1").criterion.scores(a.channels), Constraints(flops=0.5, round_to=8))
    for gi, n in _kept_channels(a, plan).items():
        assert n % 8 == 0 or n == a.groups[gi].size, (gi, n)
    assert a.cost.macs(a.channels.keep_roots(plan.keep)) <= 0.5 * a.cost.total_macs
    slim = fxprune.compress(torchvision.models.resnet18().eval(), "l1", torch.randn(1, 3, 64, 64), 0.5, round_to=8)
    convs = [m for m in slim.modules() if isinstance(m, torch.nn.Conv2d)][1:]
    assert all(c.out_channels % 8 == 0 for c in convs)


def test_minimum_channels_and_ratio(resnet_analysis):
    a = resnet_analysis
    plan = select(a.channels, a.cost, get_method("l1").criterion.scores(a.channels), Constraints(flops=0.3, min_channels=4, min_ratio=0.25))
    for gi, n in _kept_channels(a, plan).items():
        assert n >= max(4, 0.25 * a.groups[gi].size)


def test_uniform_keeps_the_same_ratio_everywhere(resnet_analysis):
    a = resnet_analysis
    plan = select(a.channels, a.cost, get_method("uniform").criterion.scores(a.channels), Constraints(flops=0.5), uniform=True)
    ratios = {round(n / a.groups[gi].size, 2) for gi, n in _kept_channels(a, plan).items()}
    assert max(ratios) - min(ratios) <= 0.05


def test_methods_rank_differently(resnet_analysis):
    a = resnet_analysis
    plans = {m: select(a.channels, a.cost, get_method(m).criterion.scores(a.channels, 1), Constraints(flops=0.5))
             for m in ("l1", "random", "bn_scale")}
    first = a.channels.prunable_groups[0].index
    kept = {m: tuple(p.keep[first]) for m, p in plans.items()}
    assert len(set(kept.values())) == 3


def test_bn_scale_follows_gamma():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.arange(64, dtype=torch.float32) + 1)  # channel i has gamma i+1
    a = fxprune.analyze(model, torch.randn(1, 3, 64, 64))
    g = next(g for g in a.channels.prunable_groups if g.leading.target == "conv1.weight")
    scores = get_method("bn_scale").criterion.scores(a.channels)[g.index]
    bn = next(m for m in g.members if m.target == "bn1.weight")
    assert np.all(np.diff(scores[bn.unit_of_position]) > 0)


def test_l1_keeps_the_largest_filters():
    torch.manual_seed(0)
    model = torchvision.models.vgg11().eval()
    with torch.no_grad():
        model.features[0].weight[:8].mul_(100)  # 8 dominant filters in the first conv
    x = torch.randn(1, 3, 32, 32)
    slim = fxprune.compress(model, "l1", x, 0.5)
    first = slim.get_submodule("features.0")
    assert first.out_channels < 64
    big = model.features[0].weight[:8].flatten(1)
    kept = first.weight.flatten(1)
    assert all(any(torch.equal(b, k) for k in kept) for b in big)
    assert measured_macs(slim, x) <= 0.5 * measured_macs(model, x)


@pytest.mark.parametrize("method,p", [("l1", 1), ("l2", 2)])
def test_norm_scores_are_the_group_norm_of_every_slice(resnet_analysis, method, p):
    """Each unit's score is the (p-)norm over every weight slice its group owns: filters along dim 0,
    input columns along dim 1 (computed here the slow, obvious way, in float64)."""
    from fxprune.passes.tensors import get_tensor

    a = resnet_analysis.channels
    scores = get_method(method).criterion.scores(a)
    for g in a.prunable_groups:
        expected = np.zeros(g.n_units)
        for m in g.members:
            t = get_tensor(a.gm, m.target).detach().double()
            if m.role == "channel" or t.ndim < 2:
                continue
            rows = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1)
            per_slice = rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1)
            np.add.at(expected, m.unit_of_position, per_slice.numpy()[m.positions])
        expected = np.sqrt(expected) if p == 2 else expected
        np.testing.assert_allclose(scores[g.index], expected, rtol=1e-5)


@pytest.mark.parametrize("flops", [0.4, 0.1, 0.05])
def test_uniform_lands_within_one_percent_of_the_budget(flops):
    """Equal budgets when methods are compared: uniform's common ratio leaves rounding slack, which
    goes one step at a time to the groups nearest their next count; every group still keeps
    ceil(r x units) or one unit more."""
    from fxprune.nets import resnet20

    a = fxprune.analyze(resnet20().eval(), torch.randn(1, 1, 28, 28))
    scores = get_method("uniform").criterion.scores(a.channels)
    plan = select(a.channels, a.cost, scores, Constraints(flops=flops), uniform=True)
    macs = a.cost.macs(a.channels.keep_roots(plan.keep))
    assert 0.99 * flops * a.cost.total_macs <= macs <= flops * a.cost.total_macs
    fractions = [len(k) / a.groups[gi].n_units for gi, k in plan.keep.items()]
    sizes = {a.groups[gi].n_units for gi in plan.keep}
    assert max(fractions) - min(fractions) <= 1 / min(sizes) + 1e-9


@pytest.mark.parametrize("flops", [0.1, 0.05])
def test_global_ranking_spends_the_slack_the_last_unit_left(flops):
    """The prefix search stops at the first unit that does not fit (0.0987 of a 0.1 target on
    ResNet-56 before); the fill gives the best missing units of groups that still fit back."""
    from fxprune.nets import resnet56

    a = fxprune.analyze(resnet56().eval(), torch.randn(1, 1, 28, 28))
    scores = get_method("l1").criterion.scores(a.channels)
    plan = select(a.channels, a.cost, scores, Constraints(flops=flops))
    macs = a.cost.macs(a.channels.keep_roots(plan.keep))
    assert 0.995 * flops * a.cost.total_macs <= macs <= flops * a.cost.total_macs
    # what was filled is the best of what a group lacks: within a group, kept units outrank removed ones
    for gi, kept in plan.keep.items():
        s = scores[gi]
        removed = np.setdiff1d(np.arange(len(s)), kept)
        if len(removed):
            assert s[kept].min() >= s[removed].max()
