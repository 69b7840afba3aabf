"""Attention heads of torchvision's MViT (v1 and v2) are pruned whole (passes/ops/mvit_attention.py).

Structural check, as for Swin and MaxViT: slim output == masked original on random inputs (relative
tolerance 1e-5, float32: the masked reference zeroes the removed heads' `project` columns), the
attention really holds fewer heads (q/k/v rows of `qkv`, `project` columns), MACs counted by
FlopCounterMode fell and equal the cost model's recount, params fell. Tiny MViTs (32x32x4 clips,
four blocks: pooled q/k/v with strides, a block without pooling, v2's relative positions and
residual pooling); mvit_v2_s at a 64x64x4 clip (its positional sizes set to the clip's), and
`compress(mvit_v1_b() / mvit_v2_s(), "l1", 16x224x224 clip, 0.5)` (~5-10 s each single-threaded).
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.video.mvit import MSBlockConfig, MultiscaleAttention, MViT

import fxprune
from fxprune.passes.mask import masked_reference
from fxprune.passes.ops.mvit_attention import PrunedMultiscaleAttention
from fxprune.passes.plan import PruningPlan, resolve
from fxprune.passes.tensors import get_tensor
from fxprune.verify import randomize_degenerate_weights

from .conftest import assert_close_outputs, measured_macs, n_params, prune_and_check

_ATTN = (MultiscaleAttention, PrunedMultiscaleAttention)


def tiny_mvit(v2: bool) -> MViT:
    torch.manual_seed(0)
    k3, k1 = [3, 3, 3], [1, 1, 1]
    blocks = [MSBlockConfig(2, 16, 16, k3, k3, [1, 1, 1], [1, 4, 4]),
              MSBlockConfig(2, 16, 32, k3, k3, [1, 2, 2], [1, 2, 2]),
              MSBlockConfig(4, 32, 32, k3, k3, [1, 1, 1], [1, 2, 2]),
              MSBlockConfig(4, 32, 32, k1, k1, [1, 1, 1], [1, 1, 1])]  # no pooling
    model = MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=v2,
                 residual_with_cls_embed=not v2, rel_pos_embed=v2, proj_after_attn=v2, num_classes=10)
    return randomize_degenerate_weights(model.eval())


def small_mvit_v2_s() -> MViT:
    """mvit_v2_s for a 4x64x64 clip (its rel_pos tables are interpolated to the smaller maps)."""
    torch.manual_seed(0)
    model = torchvision.models.video.mvit_v2_s().eval()
    model.pos_encoding.spatial_size, model.pos_encoding.temporal_size = (16, 16), 2
    return randomize_degenerate_weights(model)


def _heads(model) -> dict:
    return {n: m.num_heads for n, m in model.named_modules() if isinstance(m, _ATTN)}


def _head_group(analysis, path):
    return next(g for g in analysis.groups
                if any(m.target == f"{path}.project.0.weight" and m.dim == 1 for m in g.members))


def _check_slim(model, analysis, slim, plan, x):
    macs = measured_macs(slim, x)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    before, after = _heads(model), _heads(slim)
    assert set(before) == set(after) and sum(after.values()) < sum(before.values())
    for path, kept in after.items():
        attn = model.get_submodule(path)
        d = attn.head_dim
        assert get_tensor(slim, f"{path}.qkv.weight").shape == (3 * kept * d, attn.embed_dim)
        assert get_tensor(slim, f"{path}.project.0.weight").shape == (attn.output_dim, kept * d)
        module = slim.get_submodule(path)
        assert module.qkv.out_features == 3 * kept * d and module.project[0].in_features == kept * d
        if kept < attn.num_heads:
            assert isinstance(module, PrunedMultiscaleAttention)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_tiny_mvit_every_attention_has_a_head_group(v2):
    model = tiny_mvit(v2)
    analysis = fxprune.analyze(model, torch.randn(1, 3, 4, 32, 32))
    # none left: the attention is handled, and so are `_unsqueeze`/`_squeeze` (input, skip pooling)
    assert analysis.boundaries == [], [(b.node, b.reason) for b in analysis.boundaries]
    for path, n in _heads(model).items():
        group = _head_group(analysis, path)
        assert group.prunable and group.n_units == n, (path, group.reason)
        assert {(f"{path}.qkv.weight", 0), (f"{path}.qkv.bias", 0)} <= {(m.target, m.dim) for m in group.members}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_tiny_mvit_random_plan_slim_equals_masked(v2, seed):
    model = tiny_mvit(v2)
    x = torch.randn(2, 3, 4, 32, 32)
    analysis, slim, plan = prune_and_check(model, x, seed=seed, rtol=1e-5, return_plan=True)
    _check_slim(model, analysis, slim, plan, x)
    again = fxprune.analyze(slim, x)  # the pruned attention is analysed (and pruned) again
    assert all(_head_group(again, p).prunable for p in _heads(slim))
    slim.train()
    assert slim(x).shape == (2, 10)


def test_tiny_mvit_plan_removing_chosen_heads():
    model = tiny_mvit(True)
    x = torch.randn(1, 3, 4, 32, 32)
    analysis = fxprune.analyze(model, x)
    group = _head_group(analysis, "blocks.2.attn")
    slim, _ = fxprune.prune_with_plan(analysis, PruningPlan(keep={group.index: [1, 3]}), verify_output=False)
    assert_close_outputs(masked_reference(analysis.channels, PruningPlan(keep={group.index: [1, 3]})), slim, x)
    assert _heads(slim)["blocks.2.attn"] == 2 and _heads(slim)["blocks.3.attn"] == 4
    d = model.blocks[2].attn.head_dim
    full = get_tensor(model, "blocks.2.attn.qkv.weight")
    rows = [b * 4 * d + h * d + j for b in range(3) for h in (1, 3) for j in range(d)]
    assert torch.equal(get_tensor(slim, "blocks.2.attn.qkv.weight"), full[rows])
    assert measured_macs(slim, x) < measured_macs(model, x) and n_params(slim) < n_params(model)


def test_mvit_v2_s_small_clip_random_plan():
    model = small_mvit_v2_s()
    x = torch.randn(1, 3, 4, 64, 64)
    analysis, slim, plan = prune_and_check(model, x, rtol=1e-5, return_plan=True)
    _check_slim(model, analysis, slim, plan, x)


@pytest.mark.parametrize("name", ["mvit_v1_b", "mvit_v2_s"])
def test_compress_mvit_half_flops(name):
    """Before head pruning the attention was a boundary and the minimum was ~0.54 of the MACs."""
    torch.manual_seed(0)
    model = getattr(torchvision.models.video, name)().eval()
    x = torch.randn(1, 3, 16, 224, 224)
    slim = fxprune.compress(model, "l1", x, flops=0.5)
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before and report.max_rel_error <= 1e-4
    assert sum(_heads(slim).values()) < sum(_heads(model).values())
    assert report.params_after < report.params_before


def test_tiny_mvit_recipe_round_trip(tmp_path):
    x = torch.randn(1, 3, 4, 32, 32)
    slim = fxprune.compress(tiny_mvit(True), "l1", x, flops=0.5)
    assert slim.fxprune_report.macs_after <= 0.5 * slim.fxprune_report.macs_before
    fxprune.save(slim, tmp_path / "m")
    again = fxprune.load(tmp_path / "m", base_model=tiny_mvit(True))
    assert_close_outputs(slim, again, x, rtol=0.0)
    assert _heads(again) == _heads(slim)
