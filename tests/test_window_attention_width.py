"""Swin (v1, v2) and MaxViT attention pruned per head width (`heads="width"`, passes/ops/window_attention.py).

As for nn.MultiheadAttention (`test_attention_width.py`): every head stays; q and k keep the same
positions in every head (one unit per position), v keeps its own. Structural checks: the slim output
equals the masked original (relative tolerance 1e-5, float32, random inputs: the reference zeroes
the removed q, k, v rows and output-projection columns; the slim attention keeps the original scale
1/sqrt(head_dim), v2's cosine attention normalises over the kept q/k positions, which is what the
zeroed ones give), the attention holds all its heads with narrower q/k and v, the per-head bias table
and logit scale stay whole, MACs counted by FlopCounterMode fell and equal the cost model's recount
(its q/k and v parts scale apart), params fell; non-finite values fail; Gate Decorator's consumer-side
gates touch only the q rows and the projection columns (the output stays linear in a gate).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fxprune.passes.mask import masked_reference
from fxprune.passes.ops.window_attention import (
    PrunedRelativePositionalMultiHeadAttention,
    pruned_shifted_window_attention,
    pruned_shifted_window_attention_3d,
    window_and_shift_size,
)
from fxprune.passes.param_sites import consumer_sites
from fxprune.passes.plan import PruningPlan, resolve
from fxprune.passes.tensors import get_tensor
from torchvision.models import swin_transformer as swin
from torchvision.models.video import swin_transformer as swin3d

import fxprune
from fxprune.analysis import with_grouped
from fxprune.export import check_exports
from fxprune.verify import compare, randomize_degenerate_weights

from .conftest import assert_close_outputs, measured_macs, n_params, prune_and_check
from .test_attention_methods import (
    check_gal_network_is_the_slim_model,
    check_gated_network_is_the_slim_model,
)
from .test_swin_heads import _SWA, _small_maxvit

X_SWIN = (1, 3, 32, 32)  # the tiny Swins (`_tiny_swin`); swin_t itself: test_heads_width_script
_SWA3D = (swin3d.shifted_window_attention_3d, pruned_shifted_window_attention_3d)


def _tiny_swin(v2: bool):
    torch.manual_seed(0)
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return randomize_degenerate_weights(swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5,
        **extra).eval())


def _calls(gm):
    """{attention path: (num_heads, head_dim, v_dim, scale)} of the graph's window attention calls."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SWA:
            kw = node.kwargs
            out[node.args[1].target.rsplit(".", 2)[0]] = (node.args[5], kw.get("head_dim"), kw.get("v_dim"),
                                                          kw.get("scale"))
    return out


def _width_groups(analysis, qkv: str, proj: str):
    """(q/k group, v group) of the attention whose fused projection is `qkv`."""
    groups = [g for g in analysis.groups if any(m.target == qkv and m.dim == 0 for m in g.members)]
    v = next(g for g in groups if any(m.target == proj and m.dim == 1 for m in g.members))
    return next(g for g in groups if g is not v), v


@pytest.mark.parametrize("v2, seed", [(False, 0), (True, 1)], ids=["v1", "v2"])
def test_swin_width_slim_equals_masked(v2, seed):
    model = _tiny_swin(v2)
    x = torch.randn(X_SWIN)
    analysis, slim, plan = prune_and_check(model, x, seed=seed, heads="width", return_plan=True)
    macs = measured_macs(slim, x)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    calls = _calls(slim)
    assert len(calls) == 4
    narrower = 0
    for path, (heads, qk, v, scale) in calls.items():
        attn = model.get_submodule(path)
        d = attn.qkv.in_features // attn.num_heads
        assert heads == attn.num_heads  # every head stays
        if qk is None:
            continue  # untouched: torchvision's own call
        narrower += 1
        assert scale == d ** -0.5 and qk <= d and v <= d and (qk, v) != (d, d)
        assert get_tensor(slim, f"{path}.qkv.weight").shape[0] == heads * (2 * qk + v)
        assert get_tensor(slim, f"{path}.proj.weight").shape[1] == heads * v
        table = "logit_scale" if v2 else "relative_position_bias_table"
        assert get_tensor(slim, f"{path}.{table}").shape == get_tensor(model, f"{path}.{table}").shape
    assert narrower >= 2


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_width_units_and_chosen_plan(v2):
    """Each attention has a q/k group and a v group of head_dim units; a plan keeping q/k positions
    {0, 5} and v positions {1, 2, 3} of the first block narrows both heads to exactly those."""
    model = _tiny_swin(v2)
    x = torch.randn(2, *X_SWIN[1:])
    analysis = with_grouped(fxprune.analyze(model, x), "whole", "width")
    assert analysis.boundaries == []
    path = "features.1.0.attn"
    qk, v = _width_groups(analysis, f"{path}.qkv.weight", f"{path}.proj.weight")
    assert qk.prunable and v.prunable and qk.n_units == v.n_units == 8
    heads = next(g for g in analysis.groups if any(m.target in (f"{path}.relative_position_bias_table",
                                                                f"{path}.logit_scale") for m in g.members))
    assert not heads.prunable and "heads='width'" in heads.reason
    plan = PruningPlan(keep={qk.index: [0, 5], v.index: [1, 2, 3]})
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    assert_close_outputs(masked_reference(analysis.channels, plan), slim, x, rtol=1e-5)
    assert _calls(slim)[path][:3] == (2, 2, 3)
    full = get_tensor(model, f"{path}.qkv.weight")
    rows = [block + h * 8 + j for block in (0, 16) for h in range(2) for j in (0, 5)]  # q, then k
    rows += [32 + h * 8 + j for h in range(2) for j in (1, 2, 3)]  # v
    assert torch.equal(get_tensor(slim, f"{path}.qkv.weight"), full[rows])
    assert measured_macs(slim, x) < measured_macs(model, x) and n_params(slim) < n_params(model)


def test_swin_auto_is_width_and_compress_prunes_twice():
    """heads="auto" narrows the heads (8 wide, 2 and 4 heads); compress reaches its target with them;
    the slim model (pruned calls) is analysed and pruned again."""
    model = _tiny_swin(False)
    x = torch.randn(X_SWIN)
    slim = fxprune.compress(model, "l1", x, flops=0.6, heads="auto")
    report = slim.fxprune_report
    assert report.macs_after <= 0.6 * report.macs_before and report.max_rel_error <= 1e-4
    assert measured_macs(slim, x) <= 0.6 * measured_macs(model, x) * 1.001
    calls = _calls(slim)
    assert all(heads == model.get_submodule(p).num_heads for p, (heads, *_) in calls.items())
    assert any(qk is not None for _, qk, _, _ in calls.values())
    again = fxprune.compress(slim, "l1", x, flops=0.8, heads="width")
    assert again.fxprune_report.max_rel_error <= 1e-4
    before, after = _calls(slim), _calls(again)
    assert all(after[p][3] == before[p][3] for p in before if before[p][3] is not None)  # the scale stays


def test_swin_width_gates_are_linear():
    """Gate Decorator's consumer-side gates on a width group: the q rows and the projection columns
    take the gate, the k and v rows the mask only (the output stays linear in each gate)."""
    model = _tiny_swin(False)
    analysis = with_grouped(fxprune.analyze(model, torch.randn(X_SWIN)), "whole", "width")
    path = "features.1.0.attn"
    qk, v = _width_groups(analysis, f"{path}.qkv.weight", f"{path}.proj.weight")
    e = 2 * 8
    for group, gated_rows, columns in ((qk, np.arange(e), False), (v, np.zeros(0, int), True)):
        sites = consumer_sites(analysis.channels, group)
        assert sites is not None
        for site in sites:
            for s in site.slices:
                if s.dim == 0:
                    assert set(s.positions[s.gated].tolist()) == set(gated_rows.tolist()), (site.key, group.index)
                else:
                    assert columns and s.gated.all()


# -- MaxViT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_maxvit_width_slim_equals_masked(seed):
    model = _small_maxvit()
    x = torch.randn(2, 3, 32, 32)
    analysis, slim, plan = prune_and_check(model, x, seed=seed, heads="width", return_plan=True)
    assert analysis.boundaries == []
    macs = measured_macs(slim, x)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    pruned = [m for m in slim.modules() if isinstance(m, PrunedRelativePositionalMultiHeadAttention)]
    assert pruned
    for m in pruned:
        assert m.n_heads == m.relative_position_bias_table.shape[1]  # every head and its bias column stay
        assert (m.qk_dim, m.v_dim) != (m.head_dim, m.head_dim)
        assert m.to_qkv.weight.shape[0] == m.n_heads * (2 * m.qk_dim + m.v_dim)
        assert m.merge.weight.shape[1] == m.n_heads * m.v_dim
    assert fxprune.analyze(slim, x).boundaries == []  # the narrowed leaf has a handler too
    again = with_grouped(fxprune.analyze(slim, x), "whole", "width")
    assert any(g.prunable for g in again.groups)
    with torch.no_grad():
        pruned[0].to_qkv.weight[0, 0] = float("nan")
    assert not compare(masked_reference(analysis.channels, plan), slim, analysis.inputs).passed


def test_window_attention_width_keeps_pruned_signature():
    """The pruned function with default widths is torchvision's own (same output, bit for bit)."""
    torch.manual_seed(0)
    attn = swin.ShiftedWindowAttention(32, [4, 4], [2, 2], num_heads=4).eval()
    x = torch.randn(1, 8, 8, 32)
    args = (x, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias(), [4, 4], 4, [2, 2])
    kw = dict(qkv_bias=attn.qkv.bias, proj_bias=attn.proj.bias, training=False)
    assert torch.equal(swin.shifted_window_attention(*args, **kw), pruned_shifted_window_attention(*args, **kw))


# -- the data-driven methods' training networks ------------------------------------------------------

TINY = {"swin": (lambda: _tiny_swin(False), (2, 3, 32, 32)), "swin_v2": (lambda: _tiny_swin(True), (2, 3, 32, 32)),
        "maxvit": (_small_maxvit, (2, 3, 32, 32))}


@pytest.mark.parametrize("name", list(TINY))
def test_width_gated_and_gal_networks_are_the_slim_model(name):
    """Gate Decorator's gated and GAL's masked training networks at random gates / masks (with
    zeros) equal the slim models folded from them (relative tolerance 1e-5): every width group is
    gated or masked on the reading side (q rows, projection columns; v2's k rows go with a dead
    GAL unit, its cosine attention normalising over them)."""
    build, shape = TINY[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def analyse(m):
        return with_grouped(fxprune.analyze(m, x), "whole", "width")

    check_gated_network_is_the_slim_model(build(), analyse, x)
    check_gal_network_is_the_slim_model(build(), analyse, x, ("channel",))


# -- Swin3D (video) ----------------------------------------------------------------------------------

def _tiny_swin3d():
    torch.manual_seed(0)
    return randomize_degenerate_weights(swin3d.SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[2, 4, 4],
        stochastic_depth_prob=0.0, num_classes=5).eval())


def _calls_3d(gm):
    return {n.args[1].target.rsplit(".", 2)[0]: (n.args[5], n.kwargs.get("head_dim"), n.kwargs.get("v_dim"))
            for n in gm.graph.nodes if n.op == "call_function" and n.target in _SWA3D}


@pytest.mark.parametrize("heads", ["whole", "width"])
def test_swin3d_heads_slim_equals_masked(heads):
    """Swin3D's `shifted_window_attention_3d` and its relative position bias are followed (no
    boundary): whole heads go (the bias table's columns with them) or every head is narrowed; slim ==
    masked (rtol 1e-5), the cost model's recount equals the measured MACs, the slim calls are the
    pruned function (shifted windows, and a last stage whose map is one window, unshifted)."""
    model = _tiny_swin3d()
    x = torch.randn(1, 3, 4, 32, 32)
    analysis, slim, plan = prune_and_check(model, x, heads=heads, return_plan=True)
    assert analysis.boundaries == []
    macs = measured_macs(slim, x)
    assert abs(analysis.cost.macs(resolve(analysis.channels, plan).keep_roots) - macs) <= 1e-6 * macs
    calls, original = _calls_3d(slim), _calls_3d(analysis.channels.gm)
    assert len(calls) == 3 and set(calls) == set(original)
    for path, (n, qk, v) in calls.items():
        attn = model.get_submodule(path)
        table = get_tensor(slim, f"{path}.relative_position_bias_table")
        assert table.shape[1] == n
        if heads == "width":
            assert n == attn.num_heads
        if qk is not None:
            assert get_tensor(slim, f"{path}.qkv.weight").shape[0] == n * (2 * qk + v)
    assert any(c[1] is not None for c in calls.values())  # some attention was pruned


def test_swin3d_pruned_function_defaults_are_torchvisions():
    torch.manual_seed(0)
    attn = swin3d.ShiftedWindowAttention3d(32, [2, 4, 4], [1, 2, 2], num_heads=4).eval()
    x = torch.randn(1, 4, 8, 8, 32)
    args = (x, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias([2, 4, 4]), [2, 4, 4], 4, [1, 2, 2])
    kw = dict(qkv_bias=attn.qkv.bias, proj_bias=attn.proj.bias, training=False)
    assert torch.equal(attn(x), pruned_shifted_window_attention_3d(*args, **kw))


def test_swin3d_slim_model_exports():
    """The slim Swin3D's graph calls `window_and_shift_size` (torchvision's `_get_window_and_shift_size`
    edits its list arguments, the graph's constants): `torch.export` runs it and agrees with eager
    (relative tolerance 1e-3, `check_exports`); the slim model analyses again with no boundary."""
    model = _tiny_swin3d()
    x = torch.randn(1, 3, 4, 32, 32)
    slim = fxprune.compress(model, "l1", x, flops=0.5, heads="width")
    assert slim.fxprune_report.max_rel_error <= 1e-4
    assert any(n.target is window_and_shift_size for n in slim.graph.nodes)
    assert check_exports(slim, fxprune.ExampleInputs.normalize(x), ("export",)) == {"export": "ok"}
    assert fxprune.analyze(slim, x).boundaries == []
