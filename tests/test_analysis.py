"""What the dependency analysis finds: groups, offsets, boundaries with reasons, structures."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

import fxprune

from .handler_models import Concat, FlattenLinear, GroupNormNet, Grouped, Residual


def _group_of(analysis, target, dim):
    for g in analysis.groups:
        for m in g.members:
            if m.target == target and m.dim == dim:
                return g, m
    raise AssertionError(f"{target}[{dim}] in no group")


def test_resnet_stage_is_one_group_with_shortcut_and_every_block():
    a = fxprune.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    g, _ = _group_of(a, "layer2.0.conv2.weight", 0)
    targets = {m.target for m in g.members}
    assert {"layer2.0.downsample.0.weight", "layer2.1.conv2.weight", "layer2.1.conv1.weight",
            "layer3.0.conv1.weight", "layer3.0.downsample.0.weight"} <= targets
    assert g.size == 128 and g.prunable
    input_group, _ = _group_of(a, "conv1.weight", 1)
    assert not input_group.prunable and "model input" in input_group.reason
    out_group, _ = _group_of(a, "fc.weight", 0)
    assert not out_group.prunable and "output" in out_group.reason
    assert len(a.structures.residual_branches) == 8 + 3  # 8 blocks; downsample shortcuts count too


def test_concat_members_have_exact_offsets():
    a = fxprune.analyze(Concat(), torch.randn(1, 3, 8, 8))
    # head reads cat((cat(a, inner), c, a)): a at 0 and 13, inner at 6, c at 9
    _, m_a = _group_of(a, "a.0.weight", 0)
    g_a, _ = _group_of(a, "a.0.weight", 0)
    head = [m for m in g_a.members if m.target == "head.weight"][0]
    assert sorted(head.positions.tolist()) == list(range(0, 6)) + list(range(13, 19))
    g_c, _ = _group_of(a, "c.0.weight", 0)
    head_c = [m for m in g_c.members if m.target == "head.weight"][0]
    assert (head_c.offset, head_c.length, head_c.contiguous) == (9, 4, True)
    assert len(a.structures.concat_inputs) >= 2


def test_flatten_linear_expansion_factor():
    a = fxprune.analyze(FlattenLinear(), torch.randn(1, 3, 8, 8))
    g, _ = _group_of(a, "a.0.weight", 0)
    fc = [m for m in g.members if m.target == "fc1.weight"][0]
    assert fc.length == 8 * 4  # 8 channels x 2x2 spatial features each
    assert (fc.unit_of_position[:4] == fc.unit_of_position[0]).all()


def test_grouped_conv_and_groupnorm_prune_whole_groups():
    a = fxprune.analyze(Grouped(), torch.randn(1, 3, 8, 8))
    g, _ = _group_of(a, "g.weight", 0)
    g_in, _ = _group_of(a, "a.0.weight", 0)
    assert g_in is g  # the inputs of a conv group go with its outputs
    assert g.n_units == 4  # 4 conv groups: 3 inputs + 4 outputs each
    assert [m.length for m in g.members if m.target == "g.weight"] == [16]
    a = fxprune.analyze(GroupNormNet(), torch.randn(1, 3, 8, 8))
    g, _ = _group_of(a, "gn.weight", 0)
    assert g.n_units == 4 and g.size == 12


def test_channel_shuffle_is_structured_and_layernorm_an_explained_boundary():
    # issue 17: the shuffle's (groups, width) split keeps its channels prunable (tests/test_structured_reshape.py)
    a = fxprune.analyze(torchvision.models.shufflenet_v2_x0_5(), torch.randn(1, 3, 64, 64))
    assert a.boundaries == [] and len(a.channels.prunable_groups) == len(a.groups) - 2  # all but input/output
    a = fxprune.analyze(torchvision.models.convnext_tiny(), torch.randn(1, 3, 64, 64))
    reasons = {g.reason for g in a.groups if not g.prunable}
    assert any("LayerNorm" in (r or "") for r in reasons)


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.cumsum(y, dim=1)  # mixes channels; fxprune has no handler for it
        return self.c(self.b(y))


def test_unknown_op_is_a_boundary_naming_node_and_reason():
    a = fxprune.analyze(_Unknown(), torch.randn(1, 3, 8, 8))
    assert [b.node for b in a.boundaries] == ["cumsum"]
    assert "cumsum" in a.boundaries[0].reason
    g, _ = _group_of(a, "a.weight", 0)
    assert not g.prunable and "boundary cumsum" in g.reason
    g, _ = _group_of(a, "b.weight", 0)
    assert g.prunable


def test_ignore_keeps_a_module_whole():
    a = fxprune.analyze(Residual(), torch.randn(1, 3, 8, 8), ignore=["f.0"])
    g, _ = _group_of(a, "f.0.0.weight", 0)
    assert not g.prunable and "ignore" in g.reason
    a = fxprune.analyze(Residual(), torch.randn(1, 3, 8, 8), ignore=[nn.BatchNorm2d])
    assert not a.channels.prunable_groups


def test_analysis_table_lists_groups_and_boundaries():
    text = str(fxprune.analyze(_Unknown(), torch.randn(1, 3, 8, 8)))
    assert "why not prunable" in text and "cumsum" in text and "MACs" in text and "FLOPs" in text
