"""Latency-aware selection (methods/latency_selection.py) against a fake staircase latency model.

`FakeLatencyModel` has the interface of `fxprune.latency_model.LatencyModel`: a constant plus,
per prunable group, a staircase `w_g * ceil(k / q) * q / (ceil(n / q) * q)` in its kept units k
(w_g: the group's share of the MACs), whose step edges are the multiples of q and n. Analyses are
real (`fxprune.analyze`) on resnet18 at 64x64 and on the small models of handler_models.py.
No timing is asserted anywhere: "latency" here is the fake model's prediction.
"""
from __future__ import annotations

import itertools
import math
import pickle
import zlib

import numpy as np
import pytest
import torch
import torchvision
from fxprune.passes.plan import PruningPlan, group_choices, kept_count

import fxprune
from fxprune.constraints import Constraints
from fxprune.errors import ConfigError, TargetUnreachableError
from fxprune.methods import get_method
from fxprune.methods.latency_selection import (
    EFFICIENT,
    SPEED_PLANS,
    LatencyUnreachableError,
    MeasuredFit,
    allocate_for_speed,
    auto_round,
    fit_measured,
    plan_counts,
    predict_plan,
    select_under_latency,
    snap_to_steps,
)
from fxprune.methods.selection import normalize, select

from .handler_models import HANDLER_MODELS

FULL = Constraints(flops=1.0)


class FakeLatencyModel:
    """Additive per-group staircases (module docstring); `q` an int or {group: q}."""

    def __init__(self, analysis, q=8, const=0.05, total_s=1e-3):
        channels, cost = analysis.channels, analysis.cost
        self.n = {g.index: g.n_units for g in channels.prunable_groups}
        self.q = q if isinstance(q, dict) else {g: q for g in self.n}
        share = {g: cost.total_macs - cost.macs(channels.keep_roots({g: []})) for g in self.n}
        self.w = {g: total_s * (1 - const) * v / sum(share.values()) for g, v in share.items()}
        self.const = total_s * const
        self.calls = 0
        self.original_s = self.predict({})

    def time(self, g: int, k: int) -> float:
        q, n = self.q[g], self.n[g]
        return self.w[g] * math.ceil(k / q) * q / (math.ceil(n / q) * q)

    def predict(self, kept) -> float:
        self.calls += 1
        return self.const + sum(self.time(g, kept.get(g, n)) for g, n in self.n.items())

    def group_steps(self, g: int) -> np.ndarray:
        return np.array(sorted({*range(self.q[g], self.n[g], self.q[g]), self.n[g]}))


class CoupledNoisyModel(FakeLatencyModel):
    """Not additive (a term on pairs of neighbouring groups), not monotone (+-3% deterministic noise
    per kept-count tuple): the budget must hold all the same."""

    def predict(self, kept) -> float:
        base = super().predict(kept)
        ks = [kept.get(g, n) / n for g, n in self.n.items()]
        pairs = sum(a * b for a, b in itertools.pairwise(ks)) / max(len(ks), 1)
        noise = zlib.crc32(repr(sorted(kept.items())).encode()) / 2**32 - 0.5
        return base * (1 + 0.06 * noise) + 0.2 * self.const * pairs


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    a = fxprune.analyze(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    return a, get_method("l1").criterion.scores(a.channels)


def _counts(plan):
    return {g: len(k) for g, k in plan.keep.items()}


def _importance(scores, plan):
    """Kept importance: the per-group-normalised scores of the kept units (full for absent groups)."""
    return sum(normalize(scores[g])[plan.keep[g]].sum() if g in plan.keep else normalize(scores[g]).sum()
               for g in scores)


def _allowed_counts(analysis, scores, model, constraints):
    """{group: the counts a plan may use}: the model's edges rounded down to the channel rules'
    allowed counts (not below the rule minimum), the full count and the rule minimum."""
    out = {}
    for c in group_choices(analysis.channels, scores, constraints.min_channels, constraints.min_ratio,
                           constraints.round_to):
        n, floor = len(c.units), kept_count(c, 0)
        out[c.index] = {n, floor} | {max(int(e) // c.step * c.step, floor) for e in model.group_steps(c.index) if e < n}
        assert all(kept_count(c, k) == k for k in out[c.index])  # every one satisfies the rules
    return out


def _assert_most_important_kept(scores, plan):
    for g, kept in plan.keep.items():
        n, k = len(scores[g]), len(kept)
        np.testing.assert_array_equal(kept, np.sort(np.argsort(scores[g], kind="stable")[n - k:]))


def _macs(analysis, plan):
    return analysis.cost.macs(analysis.channels.keep_roots(plan.keep))


# ------------------------------------------------------------------------------ select_under_latency


def _coarse_q(a):
    """q=8, but a quarter of the group per step in the groups of >= 256 units: a move there
    overshoots the budget by a lot, which the fill step must take back elsewhere."""
    return {g.index: g.n_units // 4 if g.n_units >= 256 else 8 for g in a.channels.prunable_groups}


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("fraction", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
def test_resnet18_never_over_the_predicted_budget_and_on_step_edges(resnet, fraction, coarse):
    a, scores = resnet
    model = FakeLatencyModel(a, q=_coarse_q(a) if coarse else 8)
    budget = fraction * model.original_s
    plan = select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
    assert predict_plan(model, plan) <= budget
    allowed = _allowed_counts(a, scores, model, FULL)
    assert set(plan.keep) == set(allowed)
    for g, k in _counts(plan).items():
        assert k in allowed[g], (g, k)
        assert k % model.q[g] == 0 or k == a.groups[g].n_units  # edges at multiples of q
    _assert_most_important_kept(scores, plan)
    # tight: no group can go one candidate up without breaking the budget (the fill step)
    counts = _counts(plan)
    for g, k in counts.items():
        above = [c for c in sorted(allowed[g]) if c > k]
        if above:
            assert model.predict({**counts, g: above[0]}) > budget, g


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_uniform_allocation_one_fraction_on_step_edges_under_the_budget(resnet, fraction):
    """allocation="uniform" (the `uniform` method under a latency target): never over the predicted
    budget, every group on an allowed count, the kept fractions more even than the importance
    greedy's, and the plan tight."""
    a, scores = resnet
    model = FakeLatencyModel(a, q=8)
    budget = fraction * model.original_s
    plan = select_under_latency(a.channels, a.cost, scores, FULL, model, budget, allocation="uniform")
    assert predict_plan(model, plan) <= budget
    allowed = _allowed_counts(a, scores, model, FULL)
    counts = _counts(plan)
    assert all(k in allowed[g] for g, k in counts.items())
    _assert_most_important_kept(scores, plan)
    spread = [k / a.groups[g].n_units for g, k in counts.items()]
    importance_plan = select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
    spread_importance = [len(importance_plan.keep[g]) / a.groups[g].n_units for g in importance_plan.keep]
    assert np.std(spread) < np.std(spread_importance)  # the uniform one is the more even of the two
    for g, k in counts.items():  # tight: the fill left no candidate up move under the budget
        above = [c for c in sorted(allowed[g]) if c > k]
        if above:
            assert model.predict({**counts, g: above[0]}) > budget, g
    with pytest.raises(ConfigError, match="allocation"):
        select_under_latency(a.channels, a.cost, scores, FULL, model, budget, allocation="even")


SMALL = ["residual_add", "unet_upsample_skip", "concat", "depthwise_multiplier", "grouped", "flatten_linear",
         "se_mul", "conv_transpose_grouped", "split", "conv1d"]


@pytest.mark.parametrize("fraction", [0.9, 0.6, 0.3])
@pytest.mark.parametrize("name", SMALL)
def test_small_models_fit_or_raise_with_the_best_value(name, fraction):
    build, shape = HANDLER_MODELS[name]
    torch.manual_seed(0)
    a = fxprune.analyze(build().eval(), torch.randn(*shape))
    scores = get_method("l1").criterion.scores(a.channels)
    assert scores, name
    model = FakeLatencyModel(a, q=2)
    budget = fraction * model.original_s
    minimum = model.predict({c.index: kept_count(c, 0) for c in group_choices(a.channels, scores, 1, 0.0, None)})
    if minimum > budget:
        with pytest.raises(LatencyUnreachableError) as info:
            select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
        assert info.value.best_s == pytest.approx(minimum)
        return
    plan = select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
    assert predict_plan(model, plan) <= budget
    allowed = _allowed_counts(a, scores, model, FULL)
    assert all(k in allowed[g] for g, k in _counts(plan).items())
    _assert_most_important_kept(scores, plan)


def test_small_models_mostly_reach_the_budgets():
    """The parametrised test above must not pass by raising everywhere."""
    reached = 0
    for name in SMALL:
        build, shape = HANDLER_MODELS[name]
        torch.manual_seed(0)
        a = fxprune.analyze(build().eval(), torch.randn(*shape))
        scores = get_method("l1").criterion.scores(a.channels)
        model = FakeLatencyModel(a, q=2)
        try:
            plan = select_under_latency(a.channels, a.cost, scores, FULL, model, 0.6 * model.original_s)
        except LatencyUnreachableError:
            continue
        reached += 1
        assert any(len(k) < a.groups[g].n_units for g, k in plan.keep.items())  # something was pruned
    assert reached >= len(SMALL) - 2


@pytest.mark.parametrize("flops", [0.8, 0.6, 0.4, 0.25])
def test_keeps_more_importance_than_flops_selections_at_their_predicted_latency(resnet, flops):
    """At the predicted latency of the plain FLOPs selection (l1 global ranking) and of `uniform`,
    the latency selection keeps at least as much normalised importance. Not a theorem (greedy vs
    global ranking), but expected: the FLOPs selections spend latency on counts between step edges
    and rank units by score alone, whatever the units cost."""
    a, scores = resnet
    model = FakeLatencyModel(a, q=8)
    for uniform in (False, True):
        ref = select(a.channels, a.cost, scores, Constraints(flops=flops), uniform=uniform)
        budget = predict_plan(model, ref)
        plan = select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
        assert predict_plan(model, plan) <= budget
        assert _importance(scores, plan) >= _importance(scores, ref), uniform


def test_unreachable_budget_raises_with_the_best_predicted_value(resnet):
    a, scores = resnet
    model = FakeLatencyModel(a, q=8)
    constraints = Constraints(flops=1.0, min_ratio=0.25)
    minimum = model.predict({c.index: kept_count(c, 0)
                             for c in group_choices(a.channels, scores, 1, 0.25, None)})
    budget = 0.5 * minimum
    with pytest.raises(LatencyUnreachableError) as info:
        select_under_latency(a.channels, a.cost, scores, constraints, model, budget)
    e = info.value
    assert isinstance(e, TargetUnreachableError)
    assert e.best_s == pytest.approx(minimum) and e.target_s == budget and not e.measured
    assert e.original_s == model.original_s
    message = str(e)
    assert f"{budget * 1e3:.4f} ms" in message and f"{minimum * 1e3:.4f} ms" in message
    assert f"{minimum / model.original_s:.4f} of the original" in message
    assert f"{budget / model.original_s:.4f} of the original" in message
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is LatencyUnreachableError and str(again) == message and again.best_s == e.best_s
    # just reachable: exactly the minimum's prediction is a valid budget, and that is what comes back
    plan = select_under_latency(a.channels, a.cost, scores, constraints, model, minimum)
    assert predict_plan(model, plan) <= minimum


def test_flops_limit_is_honoured_together_with_latency(resnet):
    a, scores = resnet
    model = FakeLatencyModel(a, q=8)
    total = a.cost.total_macs
    # FLOPs binds (latency loose), then latency binds (FLOPs loose), then both tight
    for flops, fraction in ((0.3, 0.95), (0.9, 0.4), (0.45, 0.6)):
        c = Constraints(flops=flops)
        plan = select_under_latency(a.channels, a.cost, scores, c, model, fraction * model.original_s)
        assert c.fits_macs(_macs(a, plan), total), (flops, fraction)
        assert predict_plan(model, plan) <= fraction * model.original_s
        allowed = _allowed_counts(a, scores, model, c)
        assert all(k in allowed[g] for g, k in _counts(plan).items())
    # the MACs limit binding makes the plan smaller than latency alone would
    loose = select_under_latency(a.channels, a.cost, scores, FULL, model, 0.95 * model.original_s)
    tight = select_under_latency(a.channels, a.cost, scores, Constraints(flops=0.3), model, 0.95 * model.original_s)
    assert _macs(a, tight) <= 0.3 * total < _macs(a, loose)
    with pytest.raises(TargetUnreachableError) as info:
        select_under_latency(a.channels, a.cost, scores, Constraints(flops=0.001), model, model.original_s)
    assert not isinstance(info.value, LatencyUnreachableError)


@pytest.mark.parametrize("q", [12, 5])
def test_round_to_and_minimums_are_respected(resnet, q):
    """Edges that are not multiples of round_to are rounded down to multiples; min_channels and
    min_ratio hold; the budget still holds."""
    a, scores = resnet
    model = FakeLatencyModel(a, q=q)
    c = Constraints(flops=1.0, round_to=8, min_channels=16, min_ratio=0.25)
    for fraction in (0.8, 0.55):
        budget = fraction * model.original_s
        plan = select_under_latency(a.channels, a.cost, scores, c, model, budget)
        assert predict_plan(model, plan) <= budget
        allowed = _allowed_counts(a, scores, model, c)
        for g, k in _counts(plan).items():
            size, width = a.groups[g].size, a.groups[g].unit_channels
            assert k in allowed[g]
            assert (k * width) % 8 == 0 or k * width == size
            assert k * width >= max(16, 0.25 * size)
        assert any(len(k) < a.groups[g].n_units for g, k in plan.keep.items())


@pytest.mark.parametrize("fraction", [0.85, 0.6, 0.45])
def test_coupled_noisy_model_never_over_budget(resnet, fraction):
    a, scores = resnet
    model = CoupledNoisyModel(a, q=16)
    budget = fraction * model.original_s
    plan = select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
    assert predict_plan(model, plan) <= budget
    allowed = _allowed_counts(a, scores, model, FULL)
    assert all(k in allowed[g] for g, k in _counts(plan).items())


def test_cheap_units_go_first_at_equal_importance(resnet):
    """With equal scores everywhere the cost of a move is its unit count: the greedy takes latency
    from where a unit buys the most of it (the expensive groups), not evenly."""
    a, _ = resnet
    flat = {g.index: np.ones(g.n_units) for g in a.channels.prunable_groups}
    model = FakeLatencyModel(a, q=8)
    per_unit = {g: model.w[g] / n for g, n in model.n.items()}
    plan = select_under_latency(a.channels, a.cost, flat, FULL, model, 0.8 * model.original_s)
    ratio = {g: len(k) / model.n[g] for g, k in plan.keep.items()}
    dearest, cheapest = max(per_unit, key=per_unit.get), min(per_unit, key=per_unit.get)
    assert ratio[dearest] < ratio[cheapest] == 1.0


def test_moves_are_ranked_by_importance_per_second_not_by_seconds(resnet):
    """The group cheapest in latency per unit, with half its units nearly worthless, pays first:
    dropping those costs almost no importance, although other groups save more seconds a move."""
    a, _ = resnet
    model = FakeLatencyModel(a, q=8)
    per_unit = {g: model.w[g] / n for g, n in model.n.items()}
    cheap = min(per_unit, key=per_unit.get)
    n = model.n[cheap]
    scores = {g: np.ones(k) for g, k in model.n.items()}
    scores[cheap] = np.where(np.arange(n) % 2 == 0, 1e-3, 1.0)  # the even units are nearly worthless
    budget = model.original_s - 0.4 * model.w[cheap]  # needs >= 40% of that group's units gone
    plan = select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
    assert predict_plan(model, plan) <= budget
    assert all(len(k) == model.n[g] for g, k in plan.keep.items() if g != cheap)
    assert n // 2 <= len(plan.keep[cheap]) <= 0.6 * n
    assert set(range(1, n, 2)) <= set(plan.keep[cheap].tolist())  # every valuable unit stays
    assert sum(normalize(s).sum() for s in scores.values()) - _importance(scores, plan) < 1.0


# ------------------------------------------------------------------------------ fit_measured


class Selector:
    """select(budget) over resnet18 with the fake model, counting calls."""

    def __init__(self, a, scores, model):
        self.a, self.scores, self.model, self.budgets = a, scores, model, []

    def __call__(self, budget):
        self.budgets.append(budget)
        return select_under_latency(self.a.channels, self.a.cost, self.scores, FULL, self.model, budget)


@pytest.fixture(scope="module")
def selector_parts(resnet):
    a, scores = resnet
    return a, scores, FakeLatencyModel(a, q=8)


def test_fit_measured_honest_measure_returns_the_first_plan(selector_parts):
    a, scores, model = selector_parts
    sel = Selector(a, scores, model)
    target = 0.6 * model.original_s
    fit = fit_measured(sel, lambda p: predict_plan(model, p), target, latency_model=model)
    assert isinstance(fit, MeasuredFit)
    assert sel.budgets == [target] and len(fit.rounds) == 1
    assert fit.measured_s <= target and fit.predicted_budget_s == target
    assert fit.predicted_s == pytest.approx(fit.measured_s)
    assert plan_counts(a.channels, fit.plan) == plan_counts(a.channels, sel(target))


def test_fit_measured_corrects_a_model_that_underestimates(selector_parts):
    a, scores, model = selector_parts
    sel = Selector(a, scores, model)
    target = 0.6 * model.original_s
    fit = fit_measured(sel, lambda p: 1.25 * predict_plan(model, p), target, latency_model=model)
    assert fit.measured_s <= target and 1 < len(fit.rounds) <= 6
    budgets = [r["budget_s"] for r in fit.rounds]
    assert all(b2 <= 0.97 * b1 for b1, b2 in itertools.pairwise(budgets))
    assert all(r["measured_s"] > target for r in fit.rounds[:-1])
    assert fit.rounds[-1]["measured_s"] == fit.measured_s
    # same without a latency model: the budget alone is scaled, it still gets there
    fit2 = fit_measured(Selector(a, scores, model), lambda p: 1.25 * predict_plan(model, p), target, max_rounds=12)
    assert fit2.measured_s <= target and fit2.predicted_s is None


def test_fit_measured_always_over_raises_with_the_best_measurement(selector_parts):
    a, scores, model = selector_parts
    sel = Selector(a, scores, model)
    target = 0.7 * model.original_s
    values = iter([3 * target, 2 * target, 2.5 * target, 4 * target, 9 * target, 2.2 * target, 5 * target])
    with pytest.raises(LatencyUnreachableError) as info:
        fit_measured(sel, lambda p: next(values), target, latency_model=model)
    e = info.value
    measured = [r["measured_s"] for r in e.rounds if r["measured_s"] is not None]
    assert len(sel.budgets) <= 6 and len(e.rounds) <= 6
    assert e.best_measured_s == min(measured) == 2 * target and e.measured
    assert e.best_plan is not None and e.best_s == e.best_measured_s
    assert "measured" in str(e) and f"{2 * target * 1e3:.4f} ms" in str(e)


def test_fit_measured_increasing_measurements_end(selector_parts):
    a, scores, model = selector_parts
    calls = []

    def increasing(plan):
        calls.append(plan)
        return model.original_s * (1.0 + 0.2 * len(calls))

    with pytest.raises(LatencyUnreachableError) as info:
        fit_measured(Selector(a, scores, model), increasing, 0.5 * model.original_s, latency_model=model)
    assert info.value.best_measured_s == pytest.approx(1.2 * model.original_s)
    assert info.value.best_plan is calls[0] and len(calls) <= 6


@pytest.mark.parametrize("seed", range(4))
def test_fit_measured_noisy_measurements_end(selector_parts, seed):
    a, scores, model = selector_parts
    rng = np.random.default_rng(seed)
    target = 0.6 * model.original_s
    sel = Selector(a, scores, model)
    measure = lambda p: predict_plan(model, p) * rng.uniform(0.7, 2.5)
    try:
        fit = fit_measured(sel, measure, target, latency_model=model)
    except LatencyUnreachableError as e:
        measured = [r["measured_s"] for r in e.rounds if r["measured_s"] is not None]
        assert e.best_measured_s == min(measured) > target
        assert len(sel.budgets) <= 6
    else:
        assert fit.measured_s <= target and len(fit.rounds) <= 6


def test_fit_measured_non_finite_measurements_end():
    plans = []

    def select_fn(budget):
        plans.append(PruningPlan(keep={0: np.arange(max(1, int(budget * 1000)))}))
        return plans[-1]

    for bad in (math.nan, math.inf):
        plans.clear()
        with pytest.raises(LatencyUnreachableError) as info:
            fit_measured(select_fn, lambda p, bad=bad: bad, 0.05, max_rounds=5)
        assert info.value.best_measured_s is None and len(plans) == 5
        budgets = [r["budget_s"] for r in info.value.rounds]
        assert all(b2 <= 0.97 * b1 for b1, b2 in itertools.pairwise(budgets))


def test_fit_measured_stops_when_the_selection_stops_changing():
    fixed = PruningPlan(keep={0: np.arange(4)})
    measured = []
    with pytest.raises(LatencyUnreachableError) as info:
        fit_measured(lambda b: fixed, lambda p: measured.append(p) or 1.0, 0.5, max_rounds=6)
    assert len(measured) == 1 and info.value.rounds[-1].get("unchanged")
    assert len(info.value.rounds) == 2 and info.value.best_measured_s == 1.0


def test_fit_measured_stops_when_select_cannot_go_lower(selector_parts):
    a, scores, model = selector_parts
    sel = Selector(a, scores, model)
    target = 0.5 * model.original_s
    with pytest.raises(LatencyUnreachableError) as info:
        fit_measured(sel, lambda p: 10 * predict_plan(model, p), target, latency_model=model, max_rounds=50)
    e = info.value
    assert e.rounds[-1].get("unreachable") and isinstance(e.__cause__, LatencyUnreachableError)
    assert len(sel.budgets) < 50  # ended by the selection, not by max_rounds
    assert e.best_measured_s == min(r["measured_s"] for r in e.rounds if r["measured_s"] is not None)


def test_fit_measured_many_rounds_always_over_end_at_max_rounds():
    calls = []

    def select_fn(budget):
        calls.append(budget)
        return PruningPlan(keep={0: np.arange(len(calls))})  # always a new plan

    with pytest.raises(LatencyUnreachableError) as info:
        fit_measured(select_fn, lambda p: 1.0 + 1e-9 * len(p.keep[0]), 0.999, max_rounds=40)
    assert len(calls) == 40 and info.value.best_measured_s == pytest.approx(1.0 + 1e-9)
    assert all(b2 <= 0.97 * b1 for b1, b2 in itertools.pairwise(calls))


class StairStub:
    """One group whose predicted latency is 0.1 s per kept unit; plans only at 4, 6, 8, 10 units."""

    original_s = 1.0

    def predict(self, kept):
        return 0.1 * kept.get(0, 10)

    def group_steps(self, group):
        return np.array([4, 6, 8, 10])

    def select(self, budget):
        k = max((k for k in self.group_steps(0) if self.predict({0: k}) <= budget), default=None)
        if k is None:
            raise LatencyUnreachableError(budget, 0.4, 1.0)
        return PruningPlan(keep={0: np.arange(k)})


def test_fit_measured_scales_the_plans_prediction_not_the_budget():
    """The plan sits a step under its budget (0.6 for 0.75): scaling the budget by target/measured
    (0.75 x 0.75/0.78) would pick the same plan again and give up; scaling the plan's own
    prediction (0.6 x 0.75/0.78) reaches the next step, measured under target."""
    stub = StairStub()
    fit = fit_measured(stub.select, lambda p: 1.3 * stub.predict({0: len(p.keep[0])}), 0.75, latency_model=stub)
    assert len(fit.rounds) == 2 and len(fit.plan.keep[0]) == 4 and fit.measured_s <= 0.75
    assert fit.rounds[0]["predicted_s"] == pytest.approx(0.6) and fit.rounds[0]["measured_s"] == pytest.approx(0.78)


def test_fit_measured_starts_at_the_given_predicted_budget():
    seen = []
    fit = fit_measured(lambda b: seen.append(b) or PruningPlan(), lambda p: 0.1, 0.2, predicted_budget=0.15)
    assert seen == [0.15] and fit.predicted_budget_s == 0.15 and fit.measured_s == 0.1


# ------------------------------------------------------------------------------ snap_to_steps


@pytest.mark.parametrize("flops,round_to", [(0.5, None), (0.3, None), (0.6, 8)])
def test_snap_to_steps_lands_on_edges_within_the_macs_budget(resnet, flops, round_to):
    a, scores = resnet
    model = FakeLatencyModel(a, q=12)  # edges at multiples of 12: a FLOPs selection rarely sits on one
    c = Constraints(flops=flops, round_to=round_to)
    ref = select(a.channels, a.cost, scores, c)
    plan = snap_to_steps(a.channels, a.cost, scores, ref, model, c)
    total = a.cost.total_macs
    assert c.fits_macs(_macs(a, plan), total)
    assert predict_plan(model, plan) <= predict_plan(model, ref)
    _assert_most_important_kept(scores, plan)
    allowed = _allowed_counts(a, scores, model, c)
    before, after = _counts(ref), _counts(plan)
    moved = 0
    for g, k in after.items():
        cand = sorted(allowed[g])
        lo = max([x for x in cand if x <= before[g]], default=cand[0])
        hi = min(x for x in cand if x >= before[g])
        assert k in (lo, hi), (g, before[g], k, lo, hi)
        if round_to:
            assert (k * a.groups[g].unit_channels) % round_to == 0 or k == a.groups[g].n_units
        moved += k != before[g]
        # maximal: a group left below its upper edge could not be raised within the MACs limit
        if k < hi:
            assert not c.fits_macs(_macs(a, PruningPlan(keep={**plan.keep, g: np.arange(hi)})), total), g
    assert moved > 0


def test_snap_to_steps_keeps_counts_already_on_edges(resnet):
    a, scores = resnet
    model = FakeLatencyModel(a, q=8)
    plan = select_under_latency(a.channels, a.cost, scores, FULL, model, 0.6 * model.original_s)
    c = Constraints(flops=1.0)
    snapped = snap_to_steps(a.channels, a.cost, scores, plan, model, c)
    assert _counts(snapped) == _counts(plan)


def test_snap_to_steps_an_over_budget_plan_is_refused(resnet):
    a, scores = resnet
    model = FakeLatencyModel(a, q=8)
    full = PruningPlan(keep={g.index: np.arange(g.n_units) for g in a.channels.prunable_groups})
    with pytest.raises(TargetUnreachableError):
        snap_to_steps(a.channels, a.cost, scores, full, model, Constraints(flops=0.5))


def test_fit_measured_refuses_bad_arguments():
    for target, rounds in ((0.0, 6), (math.nan, 6), (-1.0, 6), (0.1, 0)):
        with pytest.raises(ConfigError):
            fit_measured(lambda b: PruningPlan(), lambda p: 0.0, target, max_rounds=rounds)


# ------------------------------------------------------------------------------ round_to="auto": time first


class MemoryBoundModel(FakeLatencyModel):
    """Half of the groups cost 4x the time their MACs share says (memory-bound layers): a FLOPs
    ranking does not see it, a time-first allocation must."""

    def __init__(self, analysis, q=8):
        super().__init__(analysis, q=q)
        slow = sorted(self.n)[::2]
        for g in slow:
            self.w[g] *= 4.0
        self.original_s = self.predict({})


@pytest.mark.parametrize("flops", [0.6, 0.5, 0.3])
def test_time_first_allocation_fits_the_macs_and_is_faster_than_the_flops_ranking(resnet, flops):
    a, scores = resnet
    model = MemoryBoundModel(a)
    c = Constraints(flops=flops, round_to="auto")
    total = a.cost.total_macs
    plan = allocate_for_speed(a.channels, a.cost, scores, c, model)
    assert c.fits_macs(_macs(a, plan), total)
    assert _macs(a, plan) >= 0.9 * flops * total  # lands at the target, not far under it
    _assert_most_important_kept(scores, plan)
    allowed = _allowed_counts(a, scores, model, Constraints(flops=flops))  # "auto": no integer rounding
    assert all(k in allowed[g] for g, k in _counts(plan).items())
    ref = select(a.channels, a.cost, scores, c)
    snapped = snap_to_steps(a.channels, a.cost, scores, ref, model, c)
    assert predict_plan(model, plan) < predict_plan(model, snapped)


def test_time_first_allocation_refuses_an_unreachable_flops_target(resnet):
    a, scores = resnet
    with pytest.raises(TargetUnreachableError):
        allocate_for_speed(a.channels, a.cost, scores, Constraints(flops=0.001, round_to="auto"),
                           MemoryBoundModel(a))


@pytest.mark.parametrize("model_type", [FakeLatencyModel, MemoryBoundModel, CoupledNoisyModel])
def test_auto_round_takes_the_first_efficient_candidate(resnet, model_type):
    """Candidates in order snapped, then SPEED_PLANS; the first whose predicted efficiency reaches
    EFFICIENT is taken and the later ones are not built; if none does, the most efficient."""
    a, scores = resnet
    model = model_type(a)
    c = Constraints(flops=0.5, round_to="auto")
    ref = select(a.channels, a.cost, scores, c)
    plan, compared = auto_round(a.channels, a.cost, scores, ref, model, c)
    order = ["snapped"] + [name for name, _, _ in SPEED_PLANS]
    tried = [k for k in compared if k != "chosen"]
    assert tried == order[:len(tried)]  # built in order, stopped early or not at all
    eff = {k: compared[k]["predicted_efficiency"] for k in tried}
    first = next((k for k in tried if eff[k] >= EFFICIENT), None)
    if first is not None:
        assert compared["chosen"] == first == tried[-1]
    else:
        assert tried == order and eff[compared["chosen"]] == pytest.approx(max(eff.values()))
    chosen = compared[compared["chosen"]]
    total, original = a.cost.total_macs, model.original_s
    assert chosen["macs_fraction"] == pytest.approx(_macs(a, plan) / total)
    assert chosen["predicted_fraction"] == pytest.approx(predict_plan(model, plan) / original)
    assert chosen["importance_lost"] == pytest.approx(
        sum(normalize(v).sum() for v in scores.values()) - _importance(scores, plan))
    assert c.fits_macs(_macs(a, plan), total)
    if model_type is MemoryBoundModel:
        assert compared["chosen"] != "snapped"


def test_per_mac_allocation_is_at_least_as_fast_per_mac(resnet):
    """With MACs in the price (the knapsack ratio: seconds saved per MAC of the cut), the plan is
    predicted at least as fast at the same MACs budget as the importance-first allocation, on a
    model whose slow groups are not its MAC-heavy ones."""
    a, scores = resnet
    model = MemoryBoundModel(a)
    c = Constraints(flops=0.5, round_to="auto")
    total = a.cost.total_macs
    first = allocate_for_speed(a.channels, a.cost, scores, c, model)
    per_mac = allocate_for_speed(a.channels, a.cost, scores, c, model, per_mac=1.0, per_importance=0.0)
    assert c.fits_macs(_macs(a, per_mac), total) and _macs(a, per_mac) >= 0.9 * 0.5 * total
    _assert_most_important_kept(scores, per_mac)  # importance still orders the units in a group
    eff = [(_macs(a, p) / total) / (predict_plan(model, p) / model.original_s) for p in (first, per_mac)]
    assert eff[1] >= eff[0] - 1e-9


def test_macs_removed_by_moves_equals_a_full_recount(resnet):
    """The local recount (only the node terms a group scales) gives each move's MACs exactly."""
    from fxprune.methods.latency_selection import _choices, _moved, _State

    a, scores = resnet
    c = Constraints(flops=0.5, round_to="auto")
    choices = _choices(a.channels, scores, c)
    s = _State(a.channels, a.cost, scores, choices, FakeLatencyModel(a))
    rng = np.random.default_rng(0)
    for _ in range(3):
        pos = [int(rng.integers(0, len(cand))) for cand in s.cands]
        got = s.macs_removed_by_moves(pos)
        for i in range(len(pos)):
            want = 0.0 if pos[i] == 0 else s.macs(pos) - s.macs(_moved(pos, i, -1))
            assert got[i] == pytest.approx(want, rel=1e-9, abs=1e-3)

def test_auto_round_speed_plans_keep_the_speed_floor(resnet):
    """Priced per MAC, a slow group would go to one channel; the speed candidates keep at least
    SPEED_MIN_RATIO of every group (the snapped plan follows the user's rules only)."""
    from fxprune.methods.latency_selection import SPEED_MIN_RATIO

    a, scores = resnet
    model = MemoryBoundModel(a)
    c = Constraints(flops=0.5, round_to="auto")
    plan, compared = auto_round(a.channels, a.cost, scores, select(a.channels, a.cost, scores, c), model, c)
    assert compared["chosen"] != "snapped"
    n_units = {g.index: g.n_units for g in a.channels.prunable_groups}
    assert all(len(k) >= math.ceil(SPEED_MIN_RATIO * n_units[g]) for g, k in plan.keep.items())
    # a budget the floor cannot reach leaves the snapped plan alone
    low = Constraints(flops=0.012, round_to="auto")  # floor: 1.75 % of the MACs at least
    ref = select(a.channels, a.cost, scores, low)  # reachable without the floor
    _, compared = auto_round(a.channels, a.cost, scores, ref, model, low)
    assert list(compared) == ["snapped", "chosen"]


# ------------------------------------------------------------------------------ blocks=True


class BlockFloorModel(FakeLatencyModel):
    """The staircases plus a floor per residual block (`floor_s` each, what launching its kernels
    costs whatever their width), gone when the block's add node is among the removed nodes:
    narrowing channels cannot get under the floors, removing blocks can."""

    def __init__(self, analysis, floor_s, **kw):
        self.adds = sorted({b.add for b in analysis.channels.structures.residual_branches})
        self.floor_s = floor_s
        super().__init__(analysis, **kw)

    def predict(self, kept, removed=frozenset()) -> float:
        return super().predict(kept) + self.floor_s * sum(add not in removed for add in self.adds)


@pytest.fixture(scope="module")
def resnet20_analysis():
    from fxprune.nets import resnet20

    torch.manual_seed(0)
    a = fxprune.analyze(resnet20().eval(), torch.randn(1, 1, 28, 28))
    return a, get_method("l1").criterion.scores(a.channels)


def test_removable_blocks_are_the_residual_bodies_with_a_group_inside(resnet20_analysis):
    """ResNet-20: 9 residual adds, each body holds its first conv's output group (the second conv's
    output is the stage's stream, shared with every block). A projection shortcut is not a body."""
    from fxprune.methods.latency_selection import removable_branches

    a, scores = resnet20_analysis
    choices = group_choices(a.channels, scores, 1, 0.0, None)
    found = removable_branches(a.channels, choices)
    assert len(found) == 9 and all(len(b.inner) == 1 for b in found)
    assert len({b.key[0] for b in found}) == 9
    nodes = {n.name: n for n in a.channels.gm.graph.nodes}
    for b in found:
        assert b.key[0] in b.nodes  # the add goes too: the shortcut takes its place
        inside = {nodes[n].target for n in b.nodes if nodes[n].op == "call_module"}
        inner = a.channels.groups[choices[b.inner[0]].index]
        assert all(m.target.rsplit(".", 1)[0] in inside for m in inner.members)


def test_blocks_reach_a_budget_channels_cannot_and_the_slim_model_is_the_masked_original(resnet20_analysis):
    """Under a budget below what any channel plan is predicted to reach (the block floors stay),
    blocks=True removes blocks, stays under the predicted budget, and its plan rewrites into a
    model equal to the masked original (blocks' bodies zeroed; fp32, rtol 1e-5) with fewer MACs,
    fewer convolutions and the removed bodies' nodes gone."""
    from fxprune.passes.mask import masked_reference

    from .conftest import assert_close_outputs, measured_macs

    a, scores = resnet20_analysis
    model = BlockFloorModel(a, floor_s=0.5e-3 / 9, total_s=0.5e-3)
    budget = 0.45 * model.original_s
    with pytest.raises(LatencyUnreachableError):
        select_under_latency(a.channels, a.cost, scores, FULL, model, budget)
    plan = select_under_latency(a.channels, a.cost, scores, Constraints(flops=1.0, latency=0.45, blocks=True),
                                model, budget)
    assert plan.remove_branches and predict_plan(model, plan, a.channels) <= budget
    with pytest.raises(ConfigError, match="pass the analysis' channels"):
        predict_plan(model, plan)
    slim, _ = fxprune.prune_with_plan(a, plan, verify_output=False)
    x = torch.randn(4, 1, 28, 28)
    assert_close_outputs(masked_reference(a.channels, plan), slim, x, 1e-5)
    gone = {n for add, _ in plan.remove_branches for n in [add]}
    assert not gone & {n.name for n in slim.graph.nodes}
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(slim) <= convs(a.channels.gm) - len(plan.remove_branches)
    assert measured_macs(slim, x) < measured_macs(a.channels.gm, x)


def test_blocks_are_taken_back_when_the_budget_allows(resnet20_analysis):
    """The original's own time as the budget: blocks=True removes nothing; a looser budget removes
    no more blocks than a tighter one; each plan is predicted under its budget."""
    a, scores = resnet20_analysis
    model = BlockFloorModel(a, floor_s=0.5e-3 / 9, total_s=0.5e-3)
    c = Constraints(flops=1.0, latency=0.5, blocks=True)
    loose = select_under_latency(a.channels, a.cost, scores, c, model, model.original_s)
    assert not loose.remove_branches and all(len(k) == a.channels.groups[g].n_units for g, k in loose.keep.items())
    mid = select_under_latency(a.channels, a.cost, scores, c, model, 0.6 * model.original_s)
    tight = select_under_latency(a.channels, a.cost, scores, c, model, 0.3 * model.original_s)
    assert len(mid.remove_branches) <= len(tight.remove_branches)
    for plan, frac in ((mid, 0.6), (tight, 0.3)):
        assert predict_plan(model, plan, a.channels) <= frac * model.original_s


def test_blocks_need_a_latency_target_and_a_ranked_method():
    from fxprune.nets import resnet20

    with pytest.raises(ConfigError, match="blocks=True lets a latency target"):
        Constraints(flops=0.5, blocks=True)
    with pytest.raises(ConfigError, match="must be True or False"):
        Constraints(flops=1.0, latency=0.5, blocks="yes")
    x = torch.randn(1, 1, 28, 28)
    for method in ("uniform", "gate_decorator", "gal", "metapruning"):
        with pytest.raises(ConfigError, match="does not support blocks"):
            fxprune.compress(resnet20(), method, x, flops=1.0, latency=0.5, blocks=True)
    from fxprune.cli import build_parser

    args = build_parser().parse_args(["compress", "torchvision:resnet18", "--flops", "1", "--latency", "0.5", "--blocks"])
    assert args.blocks is True


class _Nested(torch.nn.Module):
    """An outer residual block whose body holds an inner residual block (each with a group of its own)."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1)  # noqa: E731
        self.stem, self.a1, self.a2, self.b1, self.b2 = conv(3, 16), conv(16, 12), conv(12, 16), conv(16, 8), conv(8, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.a2(torch.relu(self.a1(x))))
        y = y + self.b2(torch.relu(self.b1(y)))
        return self.head((x + y).mean((2, 3)))


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2])
def test_nested_blocks_are_removed_once_and_the_rewrite_verifies(fraction):
    """A block inside a removed block goes with it: the plan never lists a branch whose add lies in
    another listed branch, and the slim model equals the masked original (fp32, rtol 1e-5)."""
    from fxprune.methods.latency_selection import removable_branches
    from fxprune.passes.mask import masked_reference

    from .conftest import assert_close_outputs

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    a = fxprune.analyze(_Nested().eval(), x)
    scores = get_method("l1").criterion.scores(a.channels)
    found = removable_branches(a.channels, group_choices(a.channels, scores, 1, 0.0, None))
    assert len(found) == 2 and sorted(len(b.inner) for b in found) == [1, 2]
    model = BlockFloorModel(a, floor_s=0.4e-3, total_s=0.2e-3)
    plan = select_under_latency(a.channels, a.cost, scores, Constraints(flops=1.0, latency=0.5, blocks=True), model,
                                fraction * model.original_s)
    listed = [add for add, _ in plan.remove_branches]
    nodes = {b.key[0]: b.nodes for b in found}
    assert not any(inner in nodes[outer] for outer in listed for inner in listed if inner != outer)
    assert predict_plan(model, plan, a.channels) <= fraction * model.original_s
    slim, _ = fxprune.prune_with_plan(a, plan, verify_output=False)
    assert_close_outputs(masked_reference(a.channels, plan), slim, x, 1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"])
def test_blocks_rewrite_torchvision_families_into_the_masked_original(name):
    """Inverted residuals, squeeze-excitation bodies, LayerNorm + layer-scale blocks, RegNet's
    bottlenecks: under a budget only block removal reaches (fake floors), the plan removes blocks
    and the slim model equals the masked original (fp32, 64x64, rtol 1e-4), with fewer MACs."""
    from fxprune.passes.mask import masked_reference

    from .conftest import assert_close_outputs, measured_macs

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    a = fxprune.analyze(getattr(torchvision.models, name)(weights=None).eval(), x[:1])
    scores = get_method("l1").criterion.scores(a.channels)
    adds = len({b.add for b in a.channels.structures.residual_branches})
    model = BlockFloorModel(a, floor_s=1e-3 / adds, total_s=0.5e-3)
    plan = select_under_latency(a.channels, a.cost, scores, Constraints(flops=1.0, latency=0.5, blocks=True), model,
                                0.4 * model.original_s)
    assert plan.remove_branches and predict_plan(model, plan, a.channels) <= 0.4 * model.original_s
    slim, _ = fxprune.prune_with_plan(a, plan, verify_output=False)
    assert_close_outputs(masked_reference(a.channels, plan), slim, x, 1e-4)
    assert measured_macs(slim, x) < measured_macs(a.channels.gm, x)


def test_fit_measured_grows_a_plan_measured_well_under_the_target(selector_parts):
    """A measurement at 0.8 x the prediction (the model overestimates): with grow=2 the budget goes
    up while the plan stays measured under the target, so more is kept; without, the first plan.
    A grown plan measured over the target is not taken: the last one under it is returned."""
    a, scores, model = selector_parts
    target = 0.6 * model.original_s
    measure = lambda p: 0.8 * predict_plan(model, p)  # noqa: E731
    first = fit_measured(Selector(a, scores, model), measure, target, latency_model=model)
    grown = fit_measured(Selector(a, scores, model), measure, target, latency_model=model, grow=2)
    assert first.measured_s <= target and grown.measured_s <= target
    assert grown.measured_s > first.measured_s and len(grown.rounds) > 1
    assert all(r.get("grow") for r in grown.rounds[1:])
    assert _importance(scores, grown.plan) > _importance(scores, first.plan)
    calls = iter([0.5, 5.0])  # the first plan far under, the grown one over: the first is kept
    over = fit_measured(Selector(a, scores, model), lambda p: next(calls) * target, target, latency_model=model,
                        grow=1)
    assert over.measured_s == 0.5 * target and len(over.rounds) == 2 and over.rounds[1]["measured_s"] == 5.0 * target
    assert plan_counts(a.channels, over.plan) == plan_counts(a.channels, first.plan)


def test_fit_measured_bisects_after_a_grow_round_overshoots(selector_parts):
    """A model that overestimates small plans (0.7x) and is right about large ones: the extrapolated
    grow budget is measured over the target, so the next rounds bisect between the last budget under
    and the first over, and end on a plan between the two: measured under the target, more
    importance kept than the first plan's. Every round's plan is measured at most once."""
    a, scores, model = selector_parts
    target = 0.6 * model.original_s
    measured = []

    def measure(plan):
        predicted = predict_plan(model, plan)
        measured.append(predicted)
        return predicted * (0.7 if predicted <= 0.7 * model.original_s else 1.0)

    first = fit_measured(Selector(a, scores, model), measure, target, latency_model=model)
    fit = fit_measured(Selector(a, scores, model), measure, target, latency_model=model, grow=3)
    grow = [r for r in fit.rounds if r.get("grow")]
    over = [r for r in grow if r["measured_s"] is not None and r["measured_s"] > target]
    assert over, "the extrapolated grow round was expected to overshoot"
    assert fit.measured_s <= target and fit.predicted_s > first.predicted_s
    assert _importance(scores, fit.plan) > _importance(scores, first.plan)
    assert fit.predicted_budget_s < min(r["budget_s"] for r in over)  # taken from inside the bracket
    assert grow[1]["budget_s"] < grow[0]["budget_s"]  # the round after the overshoot bisected down
