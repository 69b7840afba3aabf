"""Attention heads of nn.MultiheadAttention (and so torchvision's ViT) are pruned whole: the q, k, v
rows of a head and its output-projection columns. Structural check: slim output == masked original
on random inputs (relative tolerance 1e-5, float32), fewer heads, MACs counted by FlopCounterMode
fell and equal the cost model's recount, params fell; heads stay where the module's result would
change (attention weights read, masks); non-finite values fail."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune.passes.mask import masked_reference
from fxprune.passes.ops.attention import PrunedMultiheadAttention
from fxprune.passes.plan import resolve
from fxprune.verify import compare, randomize_degenerate_weights

from .conftest import assert_close_outputs, measured_macs, n_params, random_plan


def small_vit():
    return randomize_degenerate_weights(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10).eval())


class Block(nn.Module):
    """Conv features as tokens, self- or cross-attention (batch first or not), a residual, a head."""

    def __init__(self, batch_first=True, cross=False, need_weights=False, read_weights=False, mask=False):
        super().__init__()
        self.batch_first, self.cross, self.need_weights = batch_first, cross, need_weights
        self.read_weights, self.mask = read_weights, mask
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.mem = nn.Conv2d(3, 32, 1)
        self.attn = nn.MultiheadAttention(32, 8, batch_first=batch_first)
        self.head = nn.Linear(32, 5)
        self.register_buffer("attn_mask", torch.zeros(16, 16, dtype=torch.bool))  # 4x4 inputs: 16 tokens

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # N, L, C
        m = self.mem(x).flatten(2).transpose(1, 2)
        if not self.batch_first:
            t, m = t.transpose(0, 1), m.transpose(0, 1)
        kv = m if self.cross else t
        mask = self.attn_mask if self.mask else None
        out, weights = self.attn(t, kv, kv, need_weights=self.need_weights, attn_mask=mask)
        y = self.head(t + out)
        return y + weights.mean() if self.read_weights else y


def _check(model, x, seed=0):
    analysis = fxprune.analyze(model, x)
    plan = random_plan(analysis, seed)
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    ref = masked_reference(analysis.channels, plan)
    assert_close_outputs(ref, slim, x, rtol=1e-5)
    macs = measured_macs(slim, x)
    assert macs < measured_macs(model, x) and n_params(slim) < n_params(model)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    return analysis, slim, plan


def _heads(model):
    return [m.num_heads for m in model.modules() if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention))]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("build, shape", [
    (small_vit, (2, 3, 32, 32)),
    (lambda: Block(batch_first=True), (2, 3, 4, 4)),
    (lambda: Block(batch_first=False), (2, 3, 4, 4)),
    (lambda: Block(cross=True), (2, 3, 4, 4)),
], ids=["vit", "batch-first", "seq-first", "cross"])
def test_heads_pruned_slim_equals_masked(build, shape, seed):
    torch.manual_seed(seed)
    model = build()
    x = torch.randn(shape)
    analysis, slim, _ = _check(model, x, seed)
    assert analysis.boundaries == []
    assert sum(_heads(slim)) < sum(_heads(model))
    assert any(isinstance(m, PrunedMultiheadAttention) for m in slim.modules())


@pytest.mark.parametrize("kw, why", [({"need_weights": True, "read_weights": True}, "attention weights"),
                                     ({"mask": True}, "mask")])
def test_heads_stay_where_the_result_would_change(kw, why):
    model = Block(**kw).eval()
    analysis = fxprune.analyze(model, torch.randn(2, 3, 4, 4))
    group = next(g for g in analysis.groups if any(m.target == "attn.in_proj_weight" and m.dim == 0
                                                   for m in g.members))
    assert not group.prunable and why in group.reason


def test_unused_weights_with_need_weights_default_still_prunes():
    model = Block(need_weights=True).eval()  # weights computed but never read
    analysis, slim, _ = _check(model, torch.randn(2, 3, 4, 4))
    assert sum(_heads(slim)) < 8


def test_compress_vit_half_flops():
    torch.manual_seed(0)
    model = small_vit()
    x = torch.randn(1, 3, 32, 32)
    slim = fxprune.compress(model, "l1", x, flops=0.5)
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before and report.max_rel_error <= 1e-4
    assert sum(_heads(slim)) < sum(_heads(model))
    assert measured_macs(slim, x) <= 0.5 * measured_macs(model, x) * 1.001
    slim.train()
    assert slim(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # dropout path of the pruned attention


def test_non_finite_fails():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 3, 4, 4)
    analysis, slim, plan = _check(model, x)
    attn = next(m for m in slim.modules() if isinstance(m, PrunedMultiheadAttention))
    with torch.no_grad():
        attn.in_proj_weight[0, 0] = float("nan")
    assert not compare(masked_reference(analysis.channels, plan), slim, analysis.inputs).passed
