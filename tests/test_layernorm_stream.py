"""The residual stream width pruned through LayerNorm (``layernorm="prune"``, passes/ops/norm.py).

With the option a LayerNorm over the channel dim (nn.LayerNorm, F.layer_norm, torchvision's
channels-first LayerNorm2d) joins its input's channel group: the rewrite slices its weight, bias and
normalized_shape, nn.MultiheadAttention loses embedding width, a ViT's class token and positional
embedding are sliced. This is not function-preserving (the slim LayerNorm's statistics cover the
kept channels only), so the masked reference normalises over the kept channels too
(`MaskedLayerNorm`): the slim model equals it (relative tolerance 1e-5, float32), MACs counted by
FlopCounterMode fell and equal the cost model's recount, params fell. Without the option nothing
changes: LayerNorm stays a boundary.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import LayerNorm2d

import fxprune
from fxprune.analysis import with_grouped
from fxprune.errors import ArtifactError, ConfigError
from fxprune.passes.mask import masked_reference
from fxprune.passes.ops.attention import PrunedMultiheadAttention
from fxprune.passes.ops.norm import MaskedLayerNorm
from fxprune.passes.plan import resolve
from fxprune.recipe_schema import validate
from fxprune.verify import randomize_degenerate_weights

from .conftest import (
    assert_close_outputs,
    assert_module_attributes_consistent,
    measured_macs,
    n_params,
    outputs,
    random_plan,
)


class PreNormBlock(nn.Module):
    def __init__(self, dim: int, heads: int, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t):
        h = self.ln_1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.ln_2(t))


class PreNormStack(nn.Module):
    """Tokens (N, L, 12) -> a 32-wide residual stream through pre-norm attention + MLP blocks, a
    final F.layer_norm (functional, on parameters) and a mean-pooled linear head."""

    def __init__(self, depth: int = 2, dim: int = 32, heads: int = 4, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads, batch_first) for _ in range(depth))
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x)
        if not self.batch_first:
            t = t.transpose(0, 1)
        for block in self.blocks:
            t = block(t)
        t = F.layer_norm(t, (32,), self.norm_weight, self.norm_bias, 1e-6)
        return self.head(t.mean(1 if self.batch_first else 0))


class ConvNeXtLike(nn.Module):
    """A stem, one ConvNeXt block with torchvision's channels-first LayerNorm2d, a final LayerNorm2d."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.stem_norm = LayerNorm2d(dim)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.block_norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.norm = LayerNorm2d(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.block_norm(y)))).permute(0, 3, 1, 2)
        x = self.norm(x + y)
        return self.head(x.mean((2, 3)))


def tiny_vit():
    torch.manual_seed(0)
    return randomize_degenerate_weights(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10).eval())


def _model(name):
    torch.manual_seed(0)
    if name == "vit":
        return tiny_vit(), torch.randn(2, 3, 32, 32)
    if name == "convnext":
        return randomize_degenerate_weights(ConvNeXtLike().eval()), torch.randn(2, 3, 8, 8)
    model = PreNormStack(batch_first=name == "prenorm").eval()
    return randomize_degenerate_weights(model), torch.randn(2, 6, 12)


MODELS = ["prenorm", "prenorm-seq-first", "vit", "convnext"]


def _ln_group(analysis, target):
    return next(g for g in analysis.groups if any(m.target == target for m in g.members))


def _first_ln(name):
    return {"vit": "encoder.layers.encoder_layer_0.ln_1.weight", "convnext": "stem_norm.weight"}.get(
        name, "blocks.0.ln_1.weight")


@pytest.mark.parametrize("name", MODELS)
def test_boundary_is_the_default(name):
    model, x = _model(name)
    analysis = fxprune.analyze(model, x)
    group = _ln_group(analysis, _first_ln(name))
    assert not group.prunable
    assert "LayerNorm" in group.reason or "embedding dim" in group.reason, group.reason
    same = with_grouped(analysis, "whole", "whole", "boundary")
    assert same is analysis


@pytest.mark.parametrize("name", MODELS)
def test_stream_becomes_a_prunable_group(name):
    model, x = _model(name)
    analysis = with_grouped(fxprune.analyze(model, x), "whole", "whole", "prune")
    group = _ln_group(analysis, _first_ln(name))
    assert group.prunable, group.reason
    assert not any("LayerNorm" in (g.reason or "") for g in analysis.groups)
    targets = {m.target for m in group.members}
    if name == "vit":  # the class token and the positional embedding carry the stream width
        assert {"class_token", "encoder.pos_embedding", "conv_proj.weight", "encoder.ln.weight"} <= targets


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", MODELS)
def test_slim_equals_masked_reference(name, seed):
    model, x = _model(name)
    analysis = with_grouped(fxprune.analyze(model, x), "whole", "whole", "prune")
    plan = random_plan(analysis, seed)
    stream = _ln_group(analysis, _first_ln(name))
    assert stream.index in plan.keep and len(plan.keep[stream.index]) < stream.n_units
    kept = len(plan.keep[stream.index])
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    ref = masked_reference(analysis.channels, plan)
    assert any(isinstance(m, MaskedLayerNorm) for m in ref.modules())
    assert_close_outputs(ref, slim, x, rtol=1e-5)
    assert_module_attributes_consistent(slim)
    macs = measured_macs(slim, x)
    assert macs < measured_macs(model, x) and n_params(slim) < n_params(model)
    recount = analysis.cost.macs(resolve(analysis.channels, plan).keep_roots)
    assert abs(recount - macs) <= 1e-6 * macs
    lns = [m for m in slim.modules() if isinstance(m, nn.LayerNorm)]
    assert lns and all(tuple(m.normalized_shape) == (kept,) and m.weight.shape == (kept,) for m in lns)
    # not function-preserving: the slim model differs from the original (whose removed channels were nonzero)
    (_, a), (_, b) = outputs(model, x)[0], outputs(slim, x)[0]
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    # the model's own verification (prune_with_plan) compares with the same reference
    fxprune.prune_with_plan(analysis, plan, verify_output=True)


def test_compress_vit_half_flops():
    model, x = _model("vit")
    before = fxprune.compress(model, "l1", x, flops=0.5)
    slim = fxprune.compress(model, "l1", x, flops=0.5, layernorm="prune")
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before and report.max_rel_error <= 1e-4
    assert report.params_after < before.fxprune_report.params_after
    width = slim.class_token.shape[-1]
    assert width < 32 and slim.encoder.pos_embedding.shape[-1] == width and slim.conv_proj.out_channels == width
    assert all(tuple(m.normalized_shape) == (width,) for m in slim.modules() if isinstance(m, nn.LayerNorm))
    assert all(m.in_proj_weight.shape[1] == width for m in slim.modules() if isinstance(m, PrunedMultiheadAttention))
    assert slim(x).shape == (2, 10)
    assert all(tuple(m.normalized_shape) == (32,) for m in before.modules() if isinstance(m, nn.LayerNorm))


def test_compress_prenorm_and_width_heads():
    model, x = _model("prenorm")
    slim = fxprune.compress(model, "l1", x, flops=0.5, layernorm="prune", heads="width")
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before and report.max_rel_error <= 1e-4
    assert slim.embed.out_features < 32


def test_recipe_round_trip(tmp_path):
    model, x = _model("vit")
    slim = fxprune.compress(model, "l1", x, flops=0.5, layernorm="prune")
    assert slim.fxprune_recipe["layernorm"] == "prune"
    fxprune.save(slim, tmp_path / "ln")
    assert json.loads((tmp_path / "ln" / "recipe.json").read_text())["layernorm"] == "prune"
    again = fxprune.load(tmp_path / "ln", base_model=tiny_vit())
    assert_close_outputs(slim, again, x, rtol=0.0)
    assert again.class_token.shape == slim.class_token.shape
    plain = fxprune.compress(model, "l1", x, flops=0.5)
    assert "layernorm" not in plain.fxprune_recipe  # a default recipe is the same as before


def test_bad_option_is_a_config_error():
    model, x = _model("prenorm")
    with pytest.raises(ConfigError, match="'boundary'.*'prune'"):
        fxprune.compress(model, "l1", x, flops=0.5, layernorm="yes")
    with pytest.raises(ConfigError, match="'boundary'.*'prune'"):
        with_grouped(fxprune.analyze(model, x), "whole", "whole", True)


def test_bad_recipe_value_is_an_artifact_error(tmp_path):
    model, x = _model("vit")
    slim = fxprune.compress(model, "l1", x, flops=0.5, layernorm="prune")
    fxprune.save(slim, tmp_path / "ln")
    recipe = json.loads((tmp_path / "ln" / "recipe.json").read_text())
    validate(recipe, max_bytes=2**30)
    recipe["layernorm"] = "sometimes"
    with pytest.raises(ArtifactError, match="layernorm"):
        validate(recipe, max_bytes=2**30)


def test_cli_option():
    from fxprune.cli import build_parser

    args = build_parser().parse_args(["compress", "resnet18", "--layernorm", "prune"])
    assert args.layernorm == "prune"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "resnet18", "--layernorm", "maybe"])
