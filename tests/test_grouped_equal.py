"""Grouped convs pruned by an equal count per group (`grouped="equal"` / `"auto"`).

Structural check for each model (ResNeXt- and RegNet-style blocks, a functional grouped conv): a
random keep-set of every prunable group gives a slim model whose output equals the masked
original's on random inputs (relative tolerance 1e-5, float32), whose grouped convs keep their
group count with every group narrower, and whose MACs (counted by FlopCounterMode) and parameters
fell. `compress` then reaches flops=0.5 with the grouped convs thinned, not removed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxprune
from fxprune.api import with_grouped
from fxprune.errors import ConfigError
from fxprune.passes.mask import masked_reference
from fxprune.verify import compare

from .conftest import (
    measured_macs,
    prune_and_check,
    random_plan,
)


def resnext_small():
    """torchvision's ResNeXt Bottleneck, 4 groups of 8 channels in the first stage."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=4, width_per_group=8).eval()


def regnet_small():
    return torchvision.models.regnet_x_400mf(weights=None, num_classes=10).eval()


class FunctionalGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 1)
        self.w = nn.Parameter(torch.randn(24, 8, 3, 3) / 8)  # 3 groups of 8 -> 8
        self.b = nn.Parameter(torch.randn(24))
        self.c = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        return self.c(torch.relu(F.conv2d(torch.relu(self.a(x)), self.w, self.b, 1, 1, 1, 3)))


def _grouped_convs(model):
    return {n: (m.groups, m.in_channels, m.out_channels) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1}


def _check(model, x, grouped, seed=0):
    return prune_and_check(model, x, seed, grouped=grouped)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("build, shape", [(resnext_small, (2, 3, 64, 64)), (regnet_small, (1, 3, 64, 64)),
                                          (FunctionalGrouped, (2, 3, 12, 12))],
                         ids=["resnext", "regnet_x_400mf", "functional"])
def test_equal_slim_equals_masked(build, shape, seed):
    torch.manual_seed(seed)
    model = build()
    x = torch.randn(shape)
    analysis, slim = _check(model, x, "equal", seed)
    before, after = _grouped_convs(model), _grouped_convs(slim)
    for name, (g, cin, cout) in before.items():
        if name not in after:
            continue
        g2, cin2, cout2 = after[name]
        assert g2 == g, f"{name}: the group count changed ({g} -> {g2})"
        assert cin2 <= cin and cout2 <= cout
    if isinstance(model, FunctionalGrouped):
        conv = next(n for n in slim.graph.nodes if n.target is F.conv2d)
        assert conv.args[6] == 3 and slim.w.shape[0] < 24 and slim.w.shape[1] < 8  # 3 narrower groups
    else:
        assert any(after[n][1] < before[n][1] for n in after), "no grouped conv got narrower"


def test_equal_units_are_positions_of_every_group():
    model = resnext_small()
    analysis = with_grouped(fxprune.analyze(model, torch.randn(1, 3, 64, 64)), "equal")
    conv = model.layer1[0].conv2  # 4 groups of 8 in and out
    out_group = next(g for g in analysis.groups if any(m.target == "layer1.0.conv2.weight" and m.dim == 0
                                                       for m in g.members))
    assert out_group.prunable and out_group.n_units == conv.out_channels // conv.groups
    m = next(m for m in out_group.members if m.target == "layer1.0.conv2.weight" and m.dim == 0)
    units = m.unit_of_position[np.argsort(m.positions)].reshape(conv.groups, -1)
    assert (units == units[0]).all()  # position j of every group is one unit
    whole = fxprune.analyze(model, torch.randn(1, 3, 64, 64))
    wg = next(g for g in whole.groups if any(m.target == "layer1.0.conv2.weight" for m in g.members))
    assert wg.n_units == conv.groups  # today's behaviour: one unit per group


def test_auto_picks_equal_for_wide_groups_whole_for_narrow_and_depthwise():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 32, 1)
            self.wide = nn.Conv2d(32, 32, 3, padding=1, groups=2)  # 16 per group >= 2 groups: equal
            self.mid = nn.Conv2d(32, 32, 1)
            self.narrow = nn.Conv2d(32, 32, 3, padding=1, groups=16)  # 2 per group < 16: whole
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # depthwise: whole
            self.b = nn.Conv2d(32, 4, 1)

        def forward(self, x):
            y = torch.relu(self.mid(torch.relu(self.wide(torch.relu(self.a(x))))))
            return self.b(self.dw(torch.relu(self.narrow(y))))

    model = Mixed().eval()
    x = torch.randn(2, 3, 10, 10)
    analysis, slim = _check(model, x, "auto")

    def units(target):
        return next(g for g in analysis.groups if any(m.target == target and m.dim == 0 for m in g.members)).n_units

    assert units("wide.weight") == 16  # positions of a group
    assert units("narrow.weight") == 16  # whole groups (narrow's outputs share dw's whole groups)
    assert slim.wide.groups == 2 and slim.dw.groups == slim.dw.out_channels


@pytest.mark.parametrize("build", [resnext_small, regnet_small], ids=["resnext", "regnet_x_400mf"])
def test_compress_equal_reaches_half_flops(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(1, 3, 64, 64)
    slim = fxprune.compress(model, "l1", x, flops=0.5, grouped="equal")
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before
    assert report.max_rel_error <= 1e-4
    before, after = _grouped_convs(model), _grouped_convs(slim)
    thinned = [n for n in after if after[n][0] == before[n][0] and after[n][2] < before[n][2]]
    assert thinned, "no grouped conv kept its groups and got narrower"
    assert measured_macs(slim, x) <= 0.5 * measured_macs(model, x) * 1.01


def test_an_equal_count_result_saves_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    slim = fxprune.compress(model, "l1", x, flops=0.5, grouped="equal")
    fxprune.save(slim, tmp_path / "art")
    loaded = fxprune.load(tmp_path / "art")
    assert _grouped_convs(loaded) == _grouped_convs(slim)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=1e-5, atol=1e-6)


def test_an_auto_result_saves_and_loads_back(tmp_path):
    """grouped="auto" is recorded as such; load re-analyses the base model the same way (equal where
    the groups are wide enough), so the replayed model has the same grouped convs and output."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    slim = fxprune.compress(resnext_small(), "l1", x, flops=0.5, grouped="auto")
    assert slim.fxprune_recipe["grouped"] == "auto"
    fxprune.save(slim, tmp_path / "auto")
    loaded = fxprune.load(tmp_path / "auto", base_model=resnext_small())
    assert _grouped_convs(loaded) == _grouped_convs(slim)
    assert any(g == 4 and i < 32 for g, i, _ in _grouped_convs(slim).values())  # thinned, groups kept
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=1e-5, atol=1e-6)


def test_grouped_option_is_checked():
    with pytest.raises(ConfigError, match="grouped="):
        fxprune.compress(resnext_small(), "l1", torch.randn(1, 3, 32, 32), grouped="half")
    from fxprune.passes.dependency import analyze_dependencies

    analysis = fxprune.analyze(FunctionalGrouped(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="grouped="):
        analyze_dependencies(analysis.traced.graph_module, grouped="per-group")


def test_non_finite_slim_output_fails():
    torch.manual_seed(0)
    model = resnext_small()
    x = torch.randn(1, 3, 64, 64)
    analysis = with_grouped(fxprune.analyze(model, x), "equal")
    plan = random_plan(analysis)
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    with torch.no_grad():
        slim.get_submodule("layer1.0.conv2").weight[0, 0, 0, 0] = float("inf")
    assert not compare(masked_reference(analysis.channels, plan), slim, analysis.inputs).passed


def test_user_model_untouched():
    model = resnext_small()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxprune.compress(model, "l1", torch.randn(1, 3, 64, 64), flops=0.5, grouped="equal")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.layer1[0].conv2.groups == 4 and model.layer1[0].conv2.out_channels == 32


def test_cli_grouped_flag(capsys):
    from fxprune.cli import main

    assert main(["compress", "torchvision:resnext50_32x4d", "--input-shape", "1,3,64,64", "--flops", "0.5",
                 "--grouped", "equal"]) == 0
    out = capsys.readouterr().out
    assert "37/39 groups prunable" in out  # equal: input and output positions of each grouped conv
    with pytest.raises(SystemExit):
        main(["compress", "torchvision:resnext50_32x4d", "--grouped", "half"])


def test_zoo_records_grouped_and_resumes_old_runs(tmp_path):
    from fxprune.zoo.runner import _differences, result_options

    new = {"options": result_options({"method": "l1", "flops": 0.5}), "models": {}}
    assert new["options"]["grouped"] == "whole"
    old = {"options": {k: v for k, v in new["options"].items() if k != "grouped"}, "models": {}}
    assert _differences(old, new, tmp_path) == []  # a run from before the option: its default
    changed = {"options": {**new["options"], "grouped": "equal"}, "models": {}}
    assert any("--grouped whole → equal" in d for d in _differences(old, changed, tmp_path))
