"""`fxprune.analysis.group_structures`: which channel groups carry a structure (issue 17): a reshape's
channel split, a grouped conv pruned with equal positions, attention heads, a computed conv weight.

Each kind is checked on a small model that has it (the expected groups named by their members), a
plain CNN has none, the grouped convs of ``grouped="whole"`` are none, the stream of an attention is
never "heads" (even where ``layernorm="prune"`` makes it prunable), and the helper changes nothing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.video.mvit import MultiscaleAttention

import fxprune
from fxprune.analysis import STRUCTURE_KINDS, group_structures, with_grouped
from fxprune.recipe import fingerprint

from .handler_models import Grouped, Residual
from .structured_models import Shuffle, SplitAttnNet
from .test_attention_heads import Block, small_vit
from .test_computed_weights import Net as StdConvNet
from .test_mvit_heads import tiny_mvit
from .test_swin_heads import _small_maxvit


def _analysis(model, x, **options):
    torch.manual_seed(0)
    a = fxprune.analyze(model.eval(), x)
    return with_grouped(a, **{"grouped": "whole", **options}) if options else a


def _groups_with(analysis, target: str, dim: int) -> set:
    return {g.index for g in analysis.groups if any(m.target == target and m.dim == dim for m in g.members)}


def test_plain_cnn_has_no_structure():
    assert group_structures(_analysis(Residual(), torch.randn(1, 3, 8, 8))) == {}


@pytest.mark.parametrize("literal", [False, True])
def test_channel_shuffle_split(literal):
    a = _analysis(Shuffle(literal=literal), torch.randn(1, 3, 8, 8))
    found = group_structures(a)
    assert found and all(kinds == {"split"} for kinds in found.values())
    assert _groups_with(a, "a.weight", 0) <= set(found)  # the shuffled channels: conv a's rows
    assert not _groups_with(a, "b.weight", 0) & set(found)  # after the shuffle: plain channels


def test_split_attention_radix_split():
    a = _analysis(SplitAttnNet(), torch.randn(1, 3, 8, 8))
    assert any("split" in kinds for kinds in group_structures(a).values())


def test_grouped_conv_equal_and_whole():
    x = torch.randn(1, 3, 8, 8)
    equal = _analysis(Grouped(), x, grouped="equal")
    found = group_structures(equal)
    tagged = _groups_with(equal, "g.weight", 0) | _groups_with(equal, "g.weight", 1)
    assert tagged and set(found) == tagged and all(k == {"grouped_equal"} for k in found.values())
    assert group_structures(_analysis(Grouped(), x, grouped="whole")) == {}
    # torchvision's ResNeXt-50 32x4d under "auto": only the last stage's grouped convs are wide enough
    # (32 channels per group >= 32 groups): 3 blocks, each with its input and its output group
    r = _analysis(torchvision.models.resnext50_32x4d(), torch.randn(1, 3, 32, 32), grouped="auto")
    assert sum("grouped_equal" in k for k in group_structures(r).values()) == 3 * 2


@pytest.mark.parametrize("heads", ["whole", "width"])
def test_multihead_attention_heads_not_the_stream(heads):
    x = torch.randn(1, 3, 4, 4)
    a = _analysis(Block(), x, heads=heads)
    found = group_structures(a)
    head_groups = _groups_with(a, "attn.in_proj_weight", 0)
    assert len(head_groups) == (1 if heads == "whole" else 2)  # whole heads; q/k and v positions
    assert {g for g, k in found.items() if "heads" in k} == head_groups
    stream = _groups_with(a, "attn.in_proj_weight", 1) | _groups_with(a, "attn.out_proj.weight", 0)
    assert not stream & set(found)
    # a ViT's pruned stream (layernorm="prune") is prunable and still no head group
    vit = _analysis(small_vit(), torch.randn(1, 3, 32, 32), layernorm="prune")
    found = group_structures(vit)
    stream = _groups_with(vit, "encoder.layers.encoder_layer_0.self_attention.in_proj_weight", 1)
    assert stream and all(vit.groups[g].prunable for g in stream) and not stream & set(found)
    assert sum("heads" in k for k in found.values()) == 2  # one per encoder layer


def test_window_and_mvit_attention_heads():
    swin = torchvision.models.swin_t().eval()
    a = _analysis(swin, torch.randn(1, 3, 64, 64))
    heads = {g for g, k in group_structures(a).items() if "heads" in k}
    paths = [n for n, m in swin.named_modules() if isinstance(m, torchvision.models.swin_transformer.ShiftedWindowAttention)]
    assert heads == set().union(*(_groups_with(a, f"{p}.proj.weight", 1) for p in paths)) and len(heads) == len(paths)
    m = _analysis(_small_maxvit(), torch.randn(1, 3, 32, 32))
    assert sum("heads" in k for k in group_structures(m).values()) == 2 * 2  # block and grid attention, 2 blocks
    mvit = tiny_mvit(True)
    v = _analysis(mvit, torch.randn(1, 3, 4, 32, 32))
    paths = [n for n, m in mvit.named_modules() if isinstance(m, MultiscaleAttention)]
    heads = {g for g, k in group_structures(v).items() if "heads" in k}
    assert heads == set().union(*(_groups_with(v, f"{p}.project.0.weight", 1) for p in paths)) and len(heads) == 4


def test_computed_weight_conv():
    a = _analysis(StdConvNet(), torch.randn(1, 3, 8, 8))
    found = group_structures(a)
    assert set(found) == _groups_with(a, "std.weight", 0) and all(k == {"computed_weight"} for k in found.values())


def test_read_only_and_kinds_listed():
    model = Shuffle()
    a = _analysis(model, torch.randn(1, 3, 8, 8))
    before = fingerprint(a.channels)
    roots = a.channels.root.copy()
    first = group_structures(a)
    assert group_structures(a.channels) == first  # a ChannelAnalysis works as well
    assert fingerprint(a.channels) == before and np.array_equal(a.channels.root, roots)
    assert all(k <= set(STRUCTURE_KINDS) for k in first.values())
