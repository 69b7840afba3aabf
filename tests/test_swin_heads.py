"""Attention heads of torchvision's Swin (v1, v2) and MaxViT are pruned whole (passes/ops/window_attention.py).

Structural check, as for nn.MultiheadAttention: slim output == masked original on random inputs
(relative tolerance 1e-5, float32: the masked reference zeroes the removed heads' output-projection
columns), the attention really holds fewer heads (q/k/v rows, projection columns, bias-table
columns, v2's logit scale and cpb_mlp rows), MACs counted by FlopCounterMode fell and equal the
cost model's recount, params fell; heads stay, with a reason, where the per-head bias is not
followed; non-finite values fail. Swin runs at 64x64 (stage 1 pads 16x16 to 21x21 windows and
shifts; stage 4's 2x2 map fits one window, no shift); MaxViT as a two-stage 32x32 MaxVit, and
maxvit_t at 224 once.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import swin_transformer as swin
from torchvision.models.maxvit import MaxVit, RelativePositionalMultiHeadAttention

import fxprune
from fxprune.methods.magnitude.criteria import BNScale, Norm, RandomScore
from fxprune.passes.mask import masked_reference
from fxprune.passes.ops.window_attention import (
    PrunedRelativePositionalMultiHeadAttention,
    pruned_shifted_window_attention,
)
from fxprune.passes.plan import PruningPlan, resolve
from fxprune.passes.tensors import get_tensor
from fxprune.verify import compare, randomize_degenerate_weights

from .conftest import assert_close_outputs, measured_macs, n_params, prune_and_check

SWINS = ["swin_t", "swin_v2_t"]
_SWA = (swin.shifted_window_attention, pruned_shifted_window_attention)


def _swin(name):
    torch.manual_seed(0)
    return randomize_degenerate_weights(getattr(torchvision.models, name)().eval())


def _small_maxvit():
    torch.manual_seed(0)
    return randomize_degenerate_weights(MaxVit(
        input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval())


def _attention_paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, swin.ShiftedWindowAttention)]


def _graph_heads(gm):
    """{attention module path: num_heads} read off the (slim) graph's window attention calls."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SWA:
            out[node.args[1].target.rsplit(".", 2)[0]] = node.args[5]
    return out


def _head_group(analysis, path):
    return next(g for g in analysis.groups
                if any(m.target == f"{path}.proj.weight" and m.dim == 1 for m in g.members))


@pytest.mark.parametrize("name", SWINS)
def test_swin_every_attention_has_a_head_group(name):
    model = _swin(name)
    analysis = fxprune.analyze(model, torch.randn(1, 3, 64, 64))
    assert not [b for b in analysis.boundaries if "attention" in b.reason or "position_bias" in b.reason]
    paths = _attention_paths(model)
    assert len(paths) == 12
    for path in paths:
        attn = model.get_submodule(path)
        group = _head_group(analysis, path)
        assert group.prunable and group.n_units == attn.num_heads, (path, group.reason)
        members = {(m.target, m.dim) for m in group.members}
        per_head = ({(f"{path}.logit_scale", 0), (f"{path}.cpb_mlp.2.weight", 0)} if name == "swin_v2_t"
                    else {(f"{path}.relative_position_bias_table", 1)})
        assert {(f"{path}.qkv.weight", 0), (f"{path}.qkv.bias", 0)} | per_head <= members
    for criterion in (Norm(1), Norm(2), BNScale(), RandomScore()):
        scores = criterion.scores(analysis.channels)
        for path in paths:
            group = _head_group(analysis, path)
            assert scores[group.index].shape == (group.n_units,) and (scores[group.index] >= 0).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", SWINS)
def test_swin_random_plan_slim_equals_masked(name, seed):
    model = _swin(name)
    x = torch.randn(1, 3, 64, 64)
    analysis, slim, plan = prune_and_check(model, x, seed=seed, rtol=1e-5, return_plan=True)
    macs = measured_macs(slim, x)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    before, after = _graph_heads(analysis.channels.gm), _graph_heads(slim)
    assert set(before) == set(after) and sum(after.values()) < sum(before.values())
    for path, kept in after.items():
        attn = model.get_submodule(path)
        d = attn.qkv.in_features // attn.num_heads
        assert get_tensor(slim, f"{path}.qkv.weight").shape[0] == 3 * kept * d
        assert get_tensor(slim, f"{path}.proj.weight").shape[1] == kept * d
        if name == "swin_t":
            assert get_tensor(slim, f"{path}.relative_position_bias_table").shape[1] == kept
        else:
            assert get_tensor(slim, f"{path}.logit_scale").shape[0] == kept
            assert get_tensor(slim, f"{path}.cpb_mlp.2.weight").shape[0] == kept


@pytest.mark.parametrize("name", SWINS)
def test_swin_plan_removing_chosen_heads(name):
    """Only heads go (heads 0 and 2 of the first block, all but the last head of the last block)."""
    model = _swin(name)
    x = torch.randn(2, 3, 64, 64)
    analysis = fxprune.analyze(model, x)
    first, last = _head_group(analysis, "features.1.0.attn"), _head_group(analysis, "features.7.1.attn")
    plan = PruningPlan(keep={first.index: [1], last.index: [last.n_units - 1]})
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    assert_close_outputs(masked_reference(analysis.channels, plan), slim, x, rtol=1e-5)
    heads = _graph_heads(slim)
    assert heads["features.1.0.attn"] == 1 and heads["features.7.1.attn"] == 1
    assert heads["features.1.1.attn"] == 3  # untouched: torchvision's own function still
    table = "relative_position_bias_table" if name == "swin_t" else "cpb_mlp.2.weight"
    dim = 1 if name == "swin_t" else 0
    full = get_tensor(model, f"features.1.0.attn.{table}")
    assert torch.equal(get_tensor(slim, f"features.1.0.attn.{table}"), full.narrow(dim, 1, 1))
    assert measured_macs(slim, x) < measured_macs(model, x) and n_params(slim) < n_params(model)


@pytest.mark.parametrize("name", SWINS)
def test_swin_compress_l1(name):
    model = _swin(name)
    x = torch.randn(1, 3, 64, 64)
    slim = fxprune.compress(model, "l1", x, flops=0.6)
    report = slim.fxprune_report
    assert report.macs_after <= 0.6 * report.macs_before and report.max_rel_error <= 1e-4
    assert measured_macs(slim, x) <= 0.6 * measured_macs(model, x) * 1.001
    assert n_params(slim) < n_params(model)
    assert sum(_graph_heads(slim).values()) < sum(m.num_heads for m in model.modules()
                                                  if isinstance(m, swin.ShiftedWindowAttention))
    again = fxprune.analyze(slim, x)  # the slim model is analysed again: the pruned calls prune too
    assert not [b for b in again.boundaries if "attention" in b.reason]
    slim.train()
    assert slim(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("name", SWINS)
def test_swin_patch_merging_is_followed(name):
    """`_patch_merging_pad` maps input channel c to c, C+c, 2C+c, 3C+c: no boundary is left, and the
    stream's channels reach the merge's norm/reduction (the stream stays for the attention's sake)."""
    model = _swin(name)
    analysis = fxprune.analyze(model, torch.randn(1, 3, 64, 64))
    assert analysis.boundaries == [], [b.reason for b in analysis.boundaries]
    stream = next(g for g in analysis.groups if any(m.target == "features.0.0.weight" and m.dim == 0
                                                      for m in g.members))
    reduction = [m for m in stream.members if m.target == "features.2.reduction.weight"]
    assert reduction and reduction[0].dim == 1
    assert not stream.prunable  # LayerNorm (default "boundary") and the window attention keep it


def test_swin_non_finite_fails():
    model = _swin("swin_t")
    x = torch.randn(1, 3, 64, 64)
    analysis, slim, plan = prune_and_check(model, x, return_plan=True)
    with torch.no_grad():
        get_tensor(slim, "features.1.0.attn.qkv.weight")[0, 0] = float("nan")
    assert not compare(masked_reference(analysis.channels, plan), slim, analysis.inputs).passed


class _UntrackedBias(nn.Module):
    """Window attention whose per-head bias comes out of an op fxprune has no handler for."""

    def __init__(self, computed_weight=False):
        super().__init__()
        self.computed_weight = computed_weight
        self.attn = swin.ShiftedWindowAttention(32, [4, 4], [2, 2], num_heads=4)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        bias = torch.cumsum(self.attn.get_relative_position_bias(), dim=-1)
        qkv_weight = self.attn.qkv.weight * 2 if self.computed_weight else self.attn.qkv.weight
        y = swin.shifted_window_attention(x, qkv_weight, self.attn.proj.weight, bias, [4, 4], 4, [2, 2],
                                          qkv_bias=self.attn.qkv.bias, proj_bias=self.attn.proj.bias,
                                          training=False)
        return self.head(F.relu(y + x))


def test_swin_heads_stay_where_the_bias_is_not_followed():
    analysis = fxprune.analyze(_UntrackedBias().eval(), torch.randn(1, 8, 8, 32))
    group = _head_group(analysis, "attn")
    assert not group.prunable and "relative position bias" in group.reason


def test_swin_computed_weights_are_a_boundary():
    analysis = fxprune.analyze(_UntrackedBias(computed_weight=True).eval(), torch.randn(1, 8, 8, 32))
    assert any("window attention whose qkv/proj weights" in b.reason for b in analysis.boundaries)


# -- MaxViT ---------------------------------------------------------------------------------------

def _maxvit_heads(model):
    return [m.n_heads for m in model.modules()
            if isinstance(m, (RelativePositionalMultiHeadAttention, PrunedRelativePositionalMultiHeadAttention))]


@pytest.mark.parametrize("seed", [0, 1])
def test_maxvit_random_plan_slim_equals_masked(seed):
    model = _small_maxvit()
    x = torch.randn(2, 3, 32, 32)
    analysis, slim, plan = prune_and_check(model, x, seed=seed, rtol=1e-5, return_plan=True)
    assert analysis.boundaries == []
    paths = [n for n, m in model.named_modules() if isinstance(m, RelativePositionalMultiHeadAttention)]
    assert len(paths) == 4
    for path in paths:
        group = next(g for g in analysis.groups if any(m.target == f"{path}.merge.weight" and m.dim == 1
                                                       for m in g.members))
        assert group.prunable and group.n_units == model.get_submodule(path).n_heads
        assert (f"{path}.relative_position_bias_table", 1) in {(m.target, m.dim) for m in group.members}
    macs = measured_macs(slim, x)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    assert sum(_maxvit_heads(slim)) < sum(_maxvit_heads(model))
    for m in slim.modules():
        if isinstance(m, PrunedRelativePositionalMultiHeadAttention):
            assert m.to_qkv.weight.shape[0] == 3 * m.n_heads * m.head_dim
            assert m.merge.weight.shape[1] == m.n_heads * m.head_dim
            assert m.relative_position_bias_table.shape[1] == m.n_heads


def test_maxvit_compress_l1_and_non_finite():
    model = _small_maxvit()
    x = torch.randn(2, 3, 32, 32)
    slim = fxprune.compress(model, "l1", x, flops=0.6)
    report = slim.fxprune_report
    assert report.macs_after <= 0.6 * report.macs_before and report.max_rel_error <= 1e-4
    assert measured_macs(slim, x) <= 0.6 * measured_macs(model, x) * 1.001
    assert fxprune.analyze(slim, x).boundaries == []  # the pruned attention is a leaf with a handler too
    analysis, slim, plan = prune_and_check(model, x, return_plan=True)
    attn = next(m for m in slim.modules() if isinstance(m, PrunedRelativePositionalMultiHeadAttention))
    with torch.no_grad():
        attn.relative_position_bias_table[0, 0] = float("inf")
    assert not compare(masked_reference(analysis.channels, plan), slim, analysis.inputs).passed


def test_maxvit_t_224_half_flops():  # ~3 s single-threaded
    torch.manual_seed(0)
    model = torchvision.models.maxvit_t().eval()
    x = torch.randn(1, 3, 224, 224)
    analysis = fxprune.analyze(model, x)
    assert analysis.boundaries == []
    slim = fxprune.compress(model, "l1", x, flops=0.5)
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before and report.max_rel_error <= 1e-4
    assert sum(_maxvit_heads(slim)) < sum(_maxvit_heads(model))
