"""Shared test helpers.

`assert_equivalent` is the contract every structural test checks: the slim model's outputs equal
the masked original's on random inputs (relative tolerance 1e-5 in float32 unless stated), its
MACs (counted independently by FlopCounterMode) really fell, and so did its parameters.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.passes.inputs import ExampleInputs, output_leaves
from fxprune.passes.shapes import standard_attention_path
from fxprune.verify import randomize_degenerate_weights


def measured_macs(model: nn.Module, inputs) -> int:
    ex = ExampleInputs.normalize(inputs)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), standard_attention_path(), FlopCounterMode(display=False) as counter:
            ex.call(model)
    finally:
        model.train(was)
    return counter.get_total_flops() // 2


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: nn.Module, inputs):
    ex = ExampleInputs.normalize(inputs)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), standard_attention_path():
            return output_leaves(ex.call(model))
    finally:
        model.train(was)


def assert_close_outputs(ref: nn.Module, slim: nn.Module, inputs, rtol: float = 1e-5) -> float:
    ref_out, slim_out = outputs(ref, inputs), outputs(slim, inputs)
    assert [p for p, _ in ref_out] == [p for p, _ in slim_out]
    worst = 0.0
    for (path, a), (_, b) in zip(ref_out, slim_out):
        assert a.shape == b.shape, path
        scale = max(a.abs().max().item(), 1e-30)
        err = (a - b).abs().max().item() / scale
        assert err <= rtol, f"{path}: relative error {err:.2e} > {rtol}"
        worst = max(worst, err)
    return worst


make_verification_sensitive = randomize_degenerate_weights


def random_plan(analysis, seed: int = 0, fraction: float = 0.5):
    """Keep a random subset of units of every prunable group."""
    import numpy as np

    from fxprune.passes.plan import PruningPlan

    rng = np.random.default_rng(seed)
    keep = {}
    for g in analysis.channels.prunable_groups:
        k = max(1, int(round(g.n_units * fraction)))
        keep[g.index] = np.sort(rng.choice(g.n_units, k, replace=False))
    return PruningPlan(keep=keep)


def prune_and_check(model: nn.Module, x, seed: int = 0, fraction: float = 0.5, rtol: float = 1e-5, *,
                    grouped: str = "whole", heads: str = "whole", layernorm: str = "boundary",
                    return_plan: bool = False, **kw):
    """Random plan -> slim; asserts equivalence with the masked original, MACs and params fell.
    `grouped` / `heads` / `layernorm`: how grouped convs / attention heads / LayerNorm streams are
    pruned (`fxprune.analysis.with_grouped`). Returns (analysis,
    slim), and the plan too with `return_plan`."""
    from fxprune.analysis import with_grouped
    from fxprune.passes.mask import masked_reference

    analysis = with_grouped(fxprune.analyze(model, x, **kw), grouped, heads, layernorm)
    plan = random_plan(analysis, seed, fraction)
    assert plan.keep, "nothing prunable"
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    ref = masked_reference(analysis.channels, plan)
    assert_close_outputs(ref, slim, x, rtol)
    assert_module_attributes_consistent(slim)
    assert measured_macs(slim, x) < measured_macs(model, x)
    assert n_params(slim) < n_params(model)
    return (analysis, slim, plan) if return_plan else (analysis, slim)


def assert_module_attributes_consistent(model: nn.Module) -> None:
    """Every resized module's attributes describe its tensors (what repr and re-use rely on)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.transposed:
                assert m.weight.shape[0] == m.in_channels and m.weight.shape[1] * m.groups == m.out_channels, name
            else:
                assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels, name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            for t in (m.weight, m.running_mean):
                assert t is None or t.shape[0] == m.num_features, name
        elif isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, name
            assert m.weight is None or m.weight.shape[0] == m.num_channels, name
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            assert tuple(m.weight.shape) == tuple(m.normalized_shape), name
        elif isinstance(m, nn.PReLU):
            assert m.weight.shape[0] == m.num_parameters, name
