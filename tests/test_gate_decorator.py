"""Gate Decorator: gates keep the function, Taylor scores are right, coupled groups prune as one,
targets are met, bad input is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from fxprune.passes.gates import fold_gates, insert_gates
from fxprune.passes.plan import PruningPlan
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.methods.gate_decorator.method import GateDecoratorOptions, _mask_units, _Scores
from fxprune.train import TrainConfig, TrainingError, train

from .conftest import assert_close_outputs
from .handler_models import ResidualClassifier


def _data(n=64, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = TensorDataset(x, y) if labels else TensorDataset(x)
    return DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


_Head = ResidualClassifier


def _analysis(model=None):
    torch.manual_seed(0)
    model = (model or _Head()).eval()
    return model, fxprune.analyze(model, torch.randn(2, 3, 8, 8))


def test_gates_keep_the_function_and_cover_coupled_groups():
    model, a = _analysis()
    gated = insert_gates(a.channels)
    x = torch.randn(4, 3, 8, 8)
    assert_close_outputs(model, gated.module, x, rtol=0)
    groups_with_sites = {s.group for s in gated.sites}
    assert groups_with_sites == {g.index for g in a.channels.prunable_groups}
    # the stem/residual stream group is gated at every BN that produces it
    multi = [gi for gi in groups_with_sites if sum(s.group == gi for s in gated.sites) > 1]
    assert multi


def test_fold_and_prune_equal_the_gated_masked_model():
    model, a = _analysis()
    gated = insert_gates(a.channels)
    rng = np.random.default_rng(0)
    keep = {g.index: np.sort(rng.choice(g.n_units, max(1, g.n_units // 2), replace=False))
            for g in a.channels.prunable_groups}

    with torch.no_grad():
        for p in gated.gates():
            p.copy_(torch.rand(p.shape) + 0.5)
    _mask_units(a.channels, gated, keep)
    for s in gated.sites:  # every site of a group masks the same units
        mask = getattr(gated.module, s.mask).reshape(-1).numpy()
        assert np.array_equal(mask.astype(bool), np.isin(s.unit_of_channel, keep[s.group]))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = gated.module(x)
    fold_gates(a.channels, gated)
    slim, check = fxprune.prune_with_plan(a, PruningPlan(keep=keep))
    assert check.passed
    with torch.no_grad():
        assert torch.allclose(slim(x), expected, rtol=1e-5, atol=1e-6)


def test_taylor_score_matches_finite_differences():
    model, a = _analysis()
    gated = insert_gates(a.channels)
    with torch.no_grad():
        for p in gated.gates():
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    x, y = next(iter(_data()))
    x = x.double()
    gated.module.double()  # float64, so the finite differences are exact enough to compare
    loss_fn = torch.nn.CrossEntropyLoss()
    gated.module.eval()
    scores = _Scores(a.channels, gated)
    loss_fn(gated.module(x), y).backward()
    scores.accumulate()
    # 1) each gate channel's |g * dL/dg| equals the finite-difference estimate
    site = gated.sites[0]
    gate = getattr(gated.module, site.gate)
    flat, eps = gate.detach().reshape(-1).clone(), 1e-5

    def loss_at(c, v):
        with torch.no_grad():
            g = flat.clone()
            g[c] = v
            gate.copy_(g.reshape(gate.shape))
            return loss_fn(gated.module(x), y).double().item()

    taylor = (gate.detach() * gate.grad).abs().reshape(-1)
    for c in range(3):
        fd = (loss_at(c, flat[c] + eps) - loss_at(c, flat[c] - eps)) / (2 * eps)
        assert float(taylor[c]) == pytest.approx(abs(float(flat[c]) * fd), rel=1e-5, abs=1e-10)
    # 2) a unit's score is the sum over every gate site of its group (residual coupling)
    group = site.group
    expected = np.zeros(a.channels.groups[group].n_units)
    for s in gated.sites:
        if s.group == group:
            g = getattr(gated.module, s.gate)
            np.add.at(expected, s.unit_of_channel, (g.detach() * g.grad).abs().reshape(-1).double().numpy())
    assert np.allclose(scores.per_group[group], expected)
    assert sum(s.group == group for s in gated.sites) > 1


@pytest.mark.parametrize("schedule", ["one_shot", "tick_only", "tick_tock"])
def test_schedules_meet_the_flops_target(schedule):
    model, _ = _analysis()
    opts = dict(schedule=schedule, p=0.2, T=2, tock_epochs=1, finetune_epochs=1)
    slim = fxprune.compress(model, "gate_decorator", torch.randn(2, 3, 8, 8), 0.6, data=_data(), options=opts)
    r = slim.fxprune_report
    assert r.macs_after <= 0.6 * r.macs_before and r.max_rel_error <= 1e-4
    assert sum(p.numel() for p in model.parameters()) == r.params_before  # the user's model is untouched


@pytest.mark.parametrize("schedule,flops", [("tick_only", 0.4), ("tick_tock", 0.4), ("tick_tock", 0.2)])
def test_the_last_tick_lands_within_one_percent_of_the_target(schedule, flops):
    """Ticks of p = 0.3 of the remaining units would overshoot a 0.4 target by far; the crossing
    Tick prunes only as many of its lowest-scored units as the target needs."""
    from fxprune.nets import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)),
                      batch_size=16)
    slim = fxprune.compress(model, "gate_decorator", torch.randn(2, 1, 16, 16), flops, data=data,
                            options=dict(schedule=schedule, p=0.3, T=2, tock_epochs=1, finetune_epochs=0))
    r = slim.fxprune_report
    assert 0.99 * flops <= r.macs_ratio <= flops, r.macs_ratio
    ticks = r.details["ticks"]
    assert len(ticks) >= 2 and ticks[-2]["macs_ratio"] > flops


def test_unlabelled_batches_are_labelled_by_the_original_model():
    model, _ = _analysis()
    slim = fxprune.compress(model, "gate_decorator", torch.randn(2, 3, 8, 8), 0.7, data=_data(labels=False),
                            options=dict(schedule="one_shot", finetune_epochs=0))
    assert slim.fxprune_report.macs_ratio <= 0.7


def test_bad_input():
    model, _ = _analysis()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TrainingError, match="needs data="):
        fxprune.compress(model, "gate_decorator", x, 0.5)
    with pytest.raises(TrainingError, match="empty"):
        fxprune.compress(model, "gate_decorator", x, 0.5, data=[], options=dict(schedule="one_shot"))
    with pytest.raises(fxprune.ConfigError, match="unknown gate_decorator schedule"):
        GateDecoratorOptions(schedule="sometimes")
    with pytest.raises(TrainingError, match="carry no labels"):
        train(model, _data(labels=False), TrainConfig(progress=False))


class _NormedAndBypassed(nn.Module):
    """MaxViT's MBConv pattern: the stem conv's output is read through a BatchNorm (`pre_norm`) and,
    past it, by a shortcut conv (`proj`): a gate after the BatchNorm would miss the shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pre_norm = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.head((self.conv_a(torch.relu(self.pre_norm(s))) + self.proj(s)).mean((2, 3)))


def test_gated_network_covers_a_reader_past_the_batchnorm():
    """The stem's group is not gated after `pre_norm` alone (its chain stops at a conv read
    elsewhere too): with half the units masked, the gated network equals the slim model (relative
    tolerance 1e-5), as the masked reference does."""
    torch.manual_seed(0)
    model = _NormedAndBypassed().eval()
    with torch.no_grad():
        model.pre_norm.running_mean.uniform_(-1, 1)
        model.pre_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, x)
    group = next(g for g in analysis.channels.prunable_groups if any(m.target == "stem.weight" for m in g.members))
    gated = insert_gates(analysis.channels)
    keep = {g.index: list(range(0, g.n_units, 2)) for g in analysis.channels.prunable_groups}
    _mask_units(analysis.channels, gated, keep)
    slim, check = fxprune.prune_with_plan(analysis, PruningPlan(keep=keep))
    assert check.passed and group.index in keep
    assert_close_outputs(gated.module, slim, x, rtol=1e-5)
