"""Removing residual branches and concat inputs: the modules really go, outputs match the masked
original (the branch replaced by zeros / the input's channels masked)."""
from __future__ import annotations

import numpy as np
import torch
import torchvision

import fxprune
from fxprune.passes.mask import masked_reference
from fxprune.passes.plan import PruningPlan

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


class _Gated(torch.nn.Module):
    """Conv -> BN -> gate, conv (no BN) -> gate, linear -> gate: what method passes insert."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 6, 1)
        self.fc1, self.fc2 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 4)
        self.g1 = torch.nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.g2 = torch.nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.g3 = torch.nn.Parameter(torch.rand(10) + 0.5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)) * self.g1)
        y = torch.relu(self.c2(y) * self.g2).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y) * self.g3))


def test_gates_are_sliced_and_folded_into_bn_conv_and_linear():
    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x)
    g1 = next(g for g in a.channels.prunable_groups if any(m.target == "g1" for m in g.members))
    keep = {g.index: np.arange(0, g.n_units, 2) for g in a.channels.prunable_groups}
    plan = PruningPlan(keep=keep, fold_scales=["g1", "g2", "g3"])
    slim = _check(a, plan, x)
    assert g1.size == 8
    assert not any(n in dict(slim.named_parameters()) for n in ("g1", "g2", "g3"))
    assert not any(n.op == "get_attr" for n in slim.graph.nodes)
    assert slim.bn1.num_features == 4 and slim.c2.out_channels == 3 and slim.fc1.out_features == 5
