"""One method protocol: every registered method leaves the user's model and the analysis it is
given unchanged and returns a value; constraints a method cannot honour are refused; a user's own
method plugs in; the slim model keeps its report, recipe and root hooks through deepcopy."""
from __future__ import annotations

import copy

import pytest
import torch
from fxprune.passes.plan import PruningPlan
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.constraints import Constraints
from fxprune.methods import (
    METHODS,
    MethodContext,
    MethodResult,
    get_method,
    make_options,
    register_method,
)

from .handler_models import Residual, ResidualClassifier

X = torch.randn(2, 3, 8, 8)

FAST = {
    "gate_decorator": dict(schedule="one_shot", finetune_epochs=0),
    "gal": dict(structures=("channel", "block"), epochs=1, mask_step=1, lam=5.0),
    "metapruning": dict(epochs=1, population=4, generations=1, parents=2, mutations=2, crossovers=2,
                        calib_batches=1),
}


def _data():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
    return DataLoader(ds, batch_size=16)


def _snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()}, module.training,
            [m.training for m in module.modules()])


def _same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_leaves_model_and_analysis_unchanged(name):
    torch.manual_seed(0)
    model = ResidualClassifier().eval()
    before = _snapshot(model)
    analysis = fxprune.analyze(model, X)
    graph_before, gm_before = analysis.traced.graph_module.code, _snapshot(analysis.traced.graph_module)
    layouts_before = dict(analysis.channels.layouts)
    method = get_method(name)
    opts = make_options(method, FAST.get(name), seed=0)
    opts_before = copy.deepcopy(opts) if opts is not None else None
    result = method.run(MethodContext(analysis, Constraints(flops=0.7), opts, _data() if method.needs_data else None,
                                      original=model))
    assert isinstance(result, MethodResult) and isinstance(result.plan, PruningPlan)
    _same(before, _snapshot(model))
    _same(gm_before, _snapshot(analysis.traced.graph_module))
    assert analysis.traced.graph_module.code == graph_before and analysis.channels.layouts == layouts_before
    if opts is not None:
        assert repr(opts) == repr(opts_before)  # options are inputs, not a log
    slim = fxprune.compress(model, name, X, 0.7, data=_data() if method.needs_data else None,
                            options=FAST.get(name))
    assert slim.fxprune_report.macs_after <= 0.7 * slim.fxprune_report.macs_before * (1 + 1e-9)
    _same(before, _snapshot(model))


@pytest.mark.parametrize("method, kwargs, message", [
    ("gate_decorator", {"round_to": 8}, "'gate_decorator' does not support round_to"),
    ("gal", {"min_channels": 2}, "'gal' does not support min_channels"),
    ("gate_decorator", {"min_ratio": 0.1}, "'gate_decorator' does not support min_ratio"),
    ("gal", {"round_to": 8}, "'gal' does not support round_to"),
    ("l1", {"params": 0.5}, "'l1' does not support params"),
])
def test_unsupported_constraints_are_refused(method, kwargs, message):
    with pytest.raises(fxprune.ConfigError, match=message):
        fxprune.compress(Residual().eval(), method, X, 0.5, data=_data(), **kwargs)


def test_one_budget_rule():
    c = Constraints(flops=0.5)
    assert c.fits_macs(50, 100) and c.fits_macs(50 * (1 + 1e-10), 100) and not c.fits_macs(50.01, 100)
    assert c.set() == {"flops"} and Constraints(flops=0.5, round_to=8).set() == {"flops", "round_to"}


def test_a_user_method_plugs_in():
    class KeepEven:
        name, options_type, supports, needs_data = "keep_even", None, frozenset(), False

        def run(self, ctx):
            return MethodResult(PruningPlan(keep={g.index: list(range(0, g.n_units, 2))
                                                  for g in ctx.analysis.channels.prunable_groups}))

    register_method(KeepEven())
    try:
        slim = fxprune.compress(Residual().eval(), "keep_even", X, 1.0)
        assert slim.fxprune_report.macs_after < slim.fxprune_report.macs_before
    finally:
        METHODS.pop("keep_even")
    with pytest.raises(fxprune.ConfigError, match="is not a method"):
        register_method(object())


def test_deepcopy_keeps_report_recipe_and_root_hooks():
    model = Residual().eval()
    model.register_forward_hook(lambda m, i, o: o + 1)
    slim = fxprune.compress(model, "l1", X, 0.5)
    again = copy.deepcopy(slim)
    assert again.fxprune_report.summary() == slim.fxprune_report.summary()
    assert again.fxprune_recipe == slim.fxprune_recipe
    with torch.no_grad():
        assert torch.equal(again(X), slim(X))


def test_latency_constraints_and_where_they_are_measured():
    from fxprune.constraints import MeasureOn

    assert Constraints(latency_ms=5.0).latency_target_s(1.0) == pytest.approx(0.005)
    assert Constraints(latency=0.5).latency_target_s(0.02) == pytest.approx(0.01)
    assert Constraints(latency_ms=5.0).set() == {"flops", "latency"}
    with pytest.raises(fxprune.ConfigError, match="not both"):
        Constraints(latency=0.5, latency_ms=3.0)
    with pytest.raises(fxprune.ConfigError, match=r"latency=1.5 must be a number in \(0, 1\]"):
        Constraints(latency=1.5)
    with pytest.raises(fxprune.ConfigError, match="measure on 'cpu' or 'cuda'"):
        MeasureOn(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(fxprune.ConfigError, match="CUDA is not available here"):
            fxprune.compress(ResidualClassifier().eval(), "metapruning", X, 1.0, latency=0.5, device="cuda",
                             data=_data())
    with pytest.raises(fxprune.ConfigError, match="dtype=torch.int8 must be a floating"):
        MeasureOn(dtype=torch.int8)
    assert MeasureOn(dtype="bf16").dtype is MeasureOn(dtype="bfloat16").dtype is torch.bfloat16  # as the CLI takes
    assert MeasureOn(dtype="torch.float16").dtype is torch.float16
    with pytest.raises(fxprune.ConfigError, match="not a floating dtype name"):
        MeasureOn(dtype="int8")
