"""Removing residual branches and concat inputs: the modules really go, outputs match the masked
original (the branch replaced by zeros / the input's channels masked)."""
from __future__ import annotations

import numpy as np
import torch
import torchvision

import fxprune
from passes.mask import masked_reference
from passes.rewrite import PruningPlan

from .conftest import assert_close_outputs, measured_macs, n_params
from .handler_models import Concat


def _check(analysis, plan, x):
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    assert_close_outputs(masked_reference(analysis.channels, plan), slim, x, rtol=1e-5)
    return slim


def test_remove_residual_blocks_of_resnet():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    a = fxprune.analyze(model, x)
    # the residual F(x) of layer1.1 and layer3.1 (identity shortcut blocks)
    branches = [b for b in a.structures.residual_branches
                if any(n.startswith(("layer1_1_conv1", "layer3_1_conv1")) for n in b.nodes)]
    assert len(branches) == 2
    plan = PruningPlan(remove_branches=[(b.add, b.operand) for b in branches])
    slim = _check(a, plan, x)
    names = {n for n, _ in slim.named_modules()}
    assert "layer1.1.conv1" not in names and "layer3.1.bn2" not in names
    assert "layer1.0.conv1" in names
    assert measured_macs(slim, x) < measured_macs(model, x)
    assert n_params(slim) < n_params(model)


def test_remove_residual_branch_and_prune_channels_together():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    a = fxprune.analyze(model, x)
    block = next(b for b in a.structures.residual_branches if any(n.startswith("layer2_1_conv1") for n in b.nodes))
    rng = np.random.default_rng(0)
    keep = {g.index: np.sort(rng.choice(g.n_units, g.n_units // 2, replace=False)) for g in a.channels.prunable_groups}
    slim = _check(a, PruningPlan(keep=keep, remove_branches=[(block.add, block.operand)]), x)
    assert "layer2.1.conv2" not in {n for n, _ in slim.named_modules()}


def test_drop_concat_input_removes_its_branch():
    model = Concat().eval()
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x)
    dropped = next(c for c in a.structures.concat_inputs if any(n.startswith("c_") for n in c.nodes))
    slim = _check(a, PruningPlan(drop_concat_inputs=[(dropped.cat, dropped.index)]), x)
    assert "c" not in dict(slim.named_children())
    assert slim.head.in_channels == 19 - 4


def test_drop_inception_branch_of_googlenet():
    model = torchvision.models.googlenet(init_weights=True).eval()
    x = torch.randn(1, 3, 96, 96)
    a = fxprune.analyze(model, x)
    branch = next(c for c in a.structures.concat_inputs if c.nodes[0].startswith("inception3a_branch4"))
    slim = _check(a, PruningPlan(drop_concat_inputs=[(branch.cat, branch.index)]), x)
    assert not hasattr(slim.inception3a, "branch4")
    assert measured_macs(slim, x) < measured_macs(model, x)
