"""The data-driven methods on a tiny ViT-like model: attention heads (`heads="whole"` / `"width"`) and
the residual stream through LayerNorm (`layernorm="prune"`).

Gate Decorator's gates and GAL's masks sit where a group's channels are produced; attention heads
are produced inside nn.MultiheadAttention and the stream also by its output projection, so there
they go on the reading side (`passes/param_sites.py`). Structural check: with random gate/mask
values and masked units, the gated (masked) training network equals the slim model the fold and the
rewrite make from it (relative tolerance 1e-5, float32) — including the LayerNorms, which normalise
over the unmasked channels as the slim model's do. Then `compress` with each method reaches the
FLOPs target (at most the target: every method lands under it), the slim model equals the masked
reference it was verified against (`report.max_rel_error <= 1e-4`; with ``layernorm="prune"`` that
reference normalises over the kept channels, `MaskedLayerNorm`), heads or head widths fell, and the
user's model is unchanged; the trained results save and load back. About 20 s single-threaded.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.analysis import with_grouped
from fxprune.methods.gate_decorator.method import _mask_units
from fxprune.passes.gal_masks import insert_soft_masks
from fxprune.passes.gal_plan import fold_masks, mask_state
from fxprune.passes.gates import fold_gates, insert_gates
from fxprune.passes.ops.attention import PrunedMultiheadAttention
from fxprune.passes.plan import PruningPlan
from fxprune.passes.rewrite import apply_plan
from fxprune.verify import randomize_degenerate_weights

from .conftest import assert_close_outputs
from .test_layernorm_stream import PreNormBlock


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded: tiny ops on a shared CPU mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def Block(dim: int, heads: int) -> nn.Module:
    """Pre-norm: x + attn(ln_1(x)), then x + mlp(ln_2(x)), batch first (test_layernorm_stream's block)."""
    return PreNormBlock(dim, heads, batch_first=True)


class TinyViT(nn.Module):
    """16x16 images -> a 4x4 patch conv stem (16 tokens of width 16) -> 2 blocks -> LayerNorm, mean, head."""

    def __init__(self, heads: int, dim: int = 16, depth: int = 2, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(t)).mean(1))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
# heads="whole": 4 heads of 4 (4 units per attention); "width": 2 heads of 8 (8 q/k and 8 v positions)
CONFIGS = {"whole": dict(heads="whole"), "width": dict(heads="width"), "ln-prune": dict(layernorm="prune"),
           "width+ln-prune": dict(heads="width", layernorm="prune")}


def _model(config: dict) -> TinyViT:
    torch.manual_seed(0)
    return randomize_degenerate_weights(TinyViT(heads=4 if config.get("heads", "whole") == "whole" else 2).eval())


def _analysis(model, config: dict):
    return with_grouped(fxprune.analyze(model, X), "whole", config.get("heads", "whole"),
                        config.get("layernorm", "boundary"))


def _data(n: int = 32, labels: bool = True) -> list:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) if labels else x[i:i + 8] for i in range(0, n, 8)]


def _attentions(model) -> list:
    return [m for m in model.modules() if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention))]


def _random_keep(analysis, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {g.index: np.sort(rng.choice(g.n_units, max(1, g.n_units // 2), replace=False))
            for g in analysis.channels.prunable_groups}


def check_gated_network_is_the_slim_model(model, analyse, x) -> None:
    """Gate Decorator: all gates 1 = the model (to 1e-6 relative); random gates, half the units masked = the slim model
    after fold_gates and the rewrite (relative tolerance 1e-5). Every prunable group is gated.
    `analyse(model)` -> the analysis (of a copy: the fold edits its modules)."""
    analysis = analyse(copy.deepcopy(model))
    gated = insert_gates(analysis.channels)
    assert gated.ungated == [] and {s.group for s in gated.sites} == {g.index for g in analysis.channels.prunable_groups}
    # all gates 1: the same arithmetic up to summation order (the gated graph's attention may take
    # other kernels: exact on an Intel Xeon, 2-3e-7 relative on an AMD EPYC), so a few float32 ulp
    assert_close_outputs(model, gated.module, x, rtol=1e-6)
    keep = _random_keep(analysis)
    with torch.no_grad():
        for p in gated.gates():
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) + 0.5)
    _mask_units(analysis.channels, gated, keep)
    fold_reference = copy.deepcopy(gated.module)  # the gated network before folding
    fold_gates(analysis.channels, gated)
    slim, check = fxprune.prune_with_plan(analysis, PruningPlan(keep=keep))
    assert check.passed
    assert_close_outputs(fold_reference, slim, x, rtol=1e-5)


def check_gal_network_is_the_slim_model(model, analyse, x, structures=("channel", "block")) -> None:
    """GAL: all masks 1 = the model (to 1e-6 relative); random masks with zeros = the slim model after fold_masks
    (relative tolerance 1e-5). Every prunable group has a mask."""
    analysis = analyse(copy.deepcopy(model))
    masked = insert_soft_masks(analysis.channels, structures)
    assert masked.skipped == {} and len(masked.channel) == len(analysis.channels.prunable_groups)
    assert_close_outputs(model, masked.module, x, rtol=1e-6)  # all masks 1: as the gates above
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in masked.params():
            v = torch.rand(p.shape, generator=g) + 0.5
            v[torch.rand(p.shape, generator=g) < 0.3] = 0
            p.copy_(v)
    expected = copy.deepcopy(masked.module)
    state = mask_state(analysis.channels, masked)
    assert any(k < n for k, n in state.widths.values())
    state.plan.scale_inputs = fold_masks(analysis.channels, masked, state)
    slim = apply_plan(analysis.channels, state.plan).eval()
    assert_close_outputs(expected, slim, x, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gated_network_at_its_masks_is_the_slim_model(name):
    """`check_gated_network_is_the_slim_model` on the tiny ViT; heads are gated on the reading side,
    and with layernorm="prune" the LayerNorms read the stream's mask."""
    model = _model(CONFIGS[name])
    gated = insert_gates(_analysis(copy.deepcopy(model), CONFIGS[name]).channels)
    assert any(s.params is not None for s in gated.sites)  # the heads: no layer of their own produces them
    if "ln-prune" in name:
        assert gated.unit_masks
    check_gated_network_is_the_slim_model(model, lambda m: _analysis(m, CONFIGS[name]), X)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gal_masked_network_is_the_slim_model(name):
    """`check_gal_network_is_the_slim_model` on the tiny ViT (masks on the reading side for heads)."""
    model = _model(CONFIGS[name])
    assert any(m.params for m in insert_soft_masks(_analysis(copy.deepcopy(model), CONFIGS[name]).channels,
                                                   ("channel", "block")).channel)
    check_gal_network_is_the_slim_model(model, lambda m: _analysis(m, CONFIGS[name]), X)


OPTIONS = {
    "gate_decorator": dict(schedule="tick_tock", p=0.2, T=2, tock_epochs=1, finetune_epochs=1),
    "gal": dict(epochs=2, mask_step=1, lam=5.0, finetune_epochs=1),
    "metapruning": dict(epochs=1, population=6, generations=2, parents=3, mutations=3, crossovers=3,
                        calib_batches=2, min_flops=0.2),
}
FLOPS = 0.5


@pytest.mark.parametrize("name", ["whole", "width", "ln-prune"])
@pytest.mark.parametrize("method", list(OPTIONS))
def test_compress_with_heads_and_the_layernorm_stream(method, name):
    config = CONFIGS[name]
    model = _model(config)
    state = copy.deepcopy(model.state_dict())
    before = _attentions(model)
    slim = fxprune.compress(model, method, X, FLOPS, data=_data(), options=OPTIONS[method], **config)
    report = slim.fxprune_report
    assert report.macs_after <= FLOPS * report.macs_before
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4  # slim == its masked reference
    assert "ungated_groups" not in (report.details or {}) and not (report.details or {}).get("unmasked")
    assert slim(X).shape == (2, 4)
    after = _attentions(slim)
    rows = sum(m.in_proj_weight.shape[0] for m in after)
    assert rows < sum(m.in_proj_weight.shape[0] for m in before)  # heads, head widths or whole branches went
    if name == "width":  # every head stays, narrower
        assert all(m.num_heads == 2 for m in after)
        assert any(m.qk_dim < 8 or m.v_dim < 8 for m in after if isinstance(m, PrunedMultiheadAttention))
    if name == "ln-prune":  # slim LayerNorms hold the kept stream (the verification normalised over it too)
        width = slim.stem.out_channels
        assert all(tuple(m.normalized_shape) == (width,) for m in slim.modules() if isinstance(m, nn.LayerNorm))
        assert all(m.in_proj_weight.shape[1] == width for m in after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the user's model is unchanged
    assert not model.training and not slim.training


def test_gate_decorator_with_fused_kernels_keeps_the_reading_side_gates():
    """`fused_kernels=True` trains a copy of the gated graph: it must hold the modules the
    reading-side gates wrap (their parameters train) and the LayerNorms' stream mask, so the
    result is the plain run's. flops=0.2: the stream loses channels, so the LayerNorm mask matters."""
    config = CONFIGS["width+ln-prune"]
    slims = []
    for fused in (False, True):
        slims.append(fxprune.compress(_model(config), "gate_decorator", X, 0.2, data=_data(),
                                      options=dict(OPTIONS["gate_decorator"], fused_kernels=fused), **config))
    plain, fused = slims
    assert plain.stem.out_channels < 16 and plain.fxprune_report.max_rel_error <= 1e-4
    assert [p.shape for p in plain.parameters()] == [p.shape for p in fused.parameters()]
    assert_close_outputs(plain, fused, X, rtol=1e-5)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_trained_results_save_and_load_back(method, tmp_path):
    """The recipe records heads and layernorm, the trained weights travel: load rebuilds the same model."""
    config = CONFIGS["width+ln-prune"]
    slim = fxprune.compress(_model(config), method, X, 0.3, data=_data(), options=OPTIONS[method], **config)
    assert (slim.fxprune_recipe["heads"], slim.fxprune_recipe["layernorm"]) == ("width", "prune")
    fxprune.save(slim, tmp_path / method)
    again = fxprune.load(tmp_path / method, base_model=_model(config))
    assert [m.in_proj_weight.shape for m in _attentions(again)] == [m.in_proj_weight.shape for m in _attentions(slim)]
    assert_close_outputs(slim, again, X, rtol=0)
