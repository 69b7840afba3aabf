"""nn.MultiheadAttention pruned per head width (`heads="width"`, passes/ops/attention.py): every head
stays; q and k keep the same positions in every head (one unit per position), v keeps its own. The
slim output equals the masked original (relative tolerance 1e-5, float32: the reference zeroes the
removed q, k, v rows and output-projection columns; the slim attention keeps the original scale
1/sqrt(head_dim)), MACs counted by FlopCounterMode fell and equal the cost model's recount (whose q/k
and v parts scale separately), the module keeps num_heads with narrower q/k and v."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune.analysis import with_grouped
from fxprune.errors import ConfigError
from fxprune.passes.mask import masked_reference
from fxprune.passes.ops.attention import PrunedMultiheadAttention
from fxprune.passes.plan import PruningPlan, resolve

from .conftest import assert_close_outputs, measured_macs, n_params, prune_and_check
from .test_attention_heads import Block, small_vit


def tiny_vit():
    torch.manual_seed(0)
    from fxprune.verify import randomize_degenerate_weights

    return randomize_degenerate_weights(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10).eval())


def _pruned(model):
    return [m for m in model.modules() if isinstance(m, PrunedMultiheadAttention)]


def _width_groups(analysis, path):
    """(q/k group, v group) of the attention at `path`."""
    groups = [g for g in analysis.groups if any(m.target == f"{path}.in_proj_weight" and m.dim == 0
                                                for m in g.members)]
    v = next(g for g in groups if any(m.target == f"{path}.out_proj.weight" and m.dim == 1 for m in g.members))
    qk = next(g for g in groups if g is not v)
    return qk, v


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("build, shape", [
    (tiny_vit, (2, 3, 32, 32)),
    (small_vit, (1, 3, 32, 32)),
    (lambda: Block(batch_first=True), (2, 3, 4, 4)),
    (lambda: Block(batch_first=False), (2, 3, 4, 4)),
    (lambda: Block(cross=True), (2, 3, 4, 4)),
], ids=["tiny-vit", "vit", "batch-first", "seq-first", "cross"])
def test_width_slim_equals_masked(build, shape, seed):
    torch.manual_seed(seed)
    model = build()
    x = torch.randn(shape)
    analysis, slim, plan = prune_and_check(model, x, seed=seed, heads="width", return_plan=True)
    macs = measured_macs(slim, x)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    pruned = _pruned(slim)
    assert len(pruned) == len(mhas)
    for before, after in zip(mhas, pruned):
        assert after.num_heads == before.num_heads
        assert after.qk_dim < before.head_dim and after.v_dim < before.head_dim
        assert after.in_proj_weight.shape[0] == after.num_heads * (2 * after.qk_dim + after.v_dim)
        assert after.out_proj.weight.shape[1] == after.num_heads * after.v_dim
        assert after.scale == before.head_dim ** -0.5


@pytest.mark.parametrize("batch_first", [True, False])
def test_width_qk_and_v_apart(batch_first):
    """q/k and v kept at different widths: the cost model's two parts are each exact."""
    torch.manual_seed(0)
    model = Block(batch_first=batch_first).eval()
    x = torch.randn(2, 3, 4, 4)
    analysis = with_grouped(fxprune.analyze(model, x), "whole", "width")
    qk, v = _width_groups(analysis, "attn")
    assert qk.prunable and v.prunable and qk.n_units == v.n_units == 4  # 8 heads of 4
    for keep_qk, keep_v in (([0], [0, 1, 3]), ([1, 2, 3], [2])):
        plan = PruningPlan(keep={qk.index: keep_qk, v.index: keep_v})
        slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
        assert_close_outputs(masked_reference(analysis.channels, plan), slim, x, rtol=1e-5)
        (attn,) = _pruned(slim)
        assert (attn.num_heads, attn.qk_dim, attn.v_dim) == (8, len(keep_qk), len(keep_v))
        w = model.attn.in_proj_weight
        rows = [h * 4 + j for h in range(8) for j in keep_qk]
        assert torch.equal(attn.in_proj_weight[: 8 * len(keep_qk)], w[rows])
        macs = measured_macs(slim, x)
        assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
        assert macs < measured_macs(model, x) and n_params(slim) < n_params(model)


def test_width_heads_stay_where_the_result_would_change():
    model = Block(mask=True).eval()
    analysis = with_grouped(fxprune.analyze(model, torch.randn(2, 3, 4, 4)), "whole", "width")
    for g in _width_groups(analysis, "attn"):
        assert not g.prunable and "mask" in g.reason


def test_auto_picks_width_for_wide_heads():
    model = tiny_vit()  # 4 heads of 8: width
    x = torch.randn(1, 3, 32, 32)
    auto = with_grouped(fxprune.analyze(model, x), "whole", "auto")
    qk, v = _width_groups(auto, "encoder.layers.encoder_layer_0.self_attention")
    assert qk.n_units == v.n_units == 8
    model = Block()  # 8 heads of 4: whole
    auto = with_grouped(fxprune.analyze(model, torch.randn(2, 3, 4, 4)), "whole", "auto")
    (group,) = [g for g in auto.groups if any(m.target == "attn.in_proj_weight" and m.dim == 0 for m in g.members)]
    assert group.n_units == 8


def test_compress_vit_width_half_flops():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    slim = fxprune.compress(model, "l1", x, flops=0.5, heads="width")
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before and report.max_rel_error <= 1e-4
    assert measured_macs(slim, x) <= 0.5 * measured_macs(model, x) * 1.001
    heads = [(m.num_heads, m.qk_dim, m.v_dim) for m in _pruned(slim)]
    assert heads and all(h == 4 for h, _, _ in heads) and any(q < 8 or v < 8 for _, q, v in heads)
    slim.train()
    assert slim(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # dropout path of the pruned attention


def test_heads_option_is_checked():
    with pytest.raises(ConfigError, match="heads="):
        fxprune.compress(Block(), "l1", torch.randn(2, 3, 4, 4), flops=0.5, heads="both")


def test_whole_is_the_default():
    model = Block().eval()
    analysis = fxprune.analyze(model, torch.randn(2, 3, 4, 4))
    groups = [g for g in analysis.groups if any(m.target == "attn.in_proj_weight" and m.dim == 0 for m in g.members)]
    assert len(groups) == 1 and groups[0].n_units == 8
    assert np.all([m.role != "in" for m in groups[0].members if m.target == "attn.in_proj_weight"])


def test_width_recipe_round_trip(tmp_path):
    """The recipe records heads="width"; loading it re-analyses the base model that way."""
    x = torch.randn(1, 3, 32, 32)
    slim = fxprune.compress(tiny_vit(), "l1", x, flops=0.5, heads="width")
    fxprune.save(slim, tmp_path / "w")
    again = fxprune.load(tmp_path / "w", base_model=tiny_vit())
    assert_close_outputs(slim, again, x, rtol=0.0)
    assert [(m.qk_dim, m.v_dim) for m in _pruned(again)] == [(m.qk_dim, m.v_dim) for m in _pruned(slim)]


def test_compress_vit_b_16_width_half_flops():
    """torchvision's vit_b_16 at 32x32 (4 patches + the class token; ~4 s single-threaded)."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32).eval()
    slim = fxprune.compress(model, "l1", torch.randn(1, 3, 32, 32), flops=0.5, heads="width")
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before and report.max_rel_error <= 1e-4
    heads = [(m.num_heads, m.qk_dim, m.v_dim) for m in _pruned(slim)]
    assert len(heads) == 12 and all(h == 12 and q < 64 and v < 64 for h, q, v in heads)
