"""Property test: random CNNs (residual adds, nested concat, split, depthwise and grouped convs
pruned as whole groups or equal counts, channel shuffles, split attention, SE blocks, transposed convs,
flatten->linear) with random keep-sets are rewritten equivalently (rel. tol 1e-5 in fp32) — or
refused with a typed fxprune error, never silently wrong."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.analysis import with_grouped
from fxprune.passes.mask import masked_reference
from fxprune.passes.plan import PruningPlan

from .conftest import assert_close_outputs, measured_macs
from .structured_models import SplitAttn

OPS = ("conv", "depthwise", "grouped", "residual", "concat", "nested_concat", "split", "se", "transposed",
       "groupnorm", "chunk", "channels_last", "shuffle", "split_attention")


class RandomCNN(nn.Module):
    """Built from a list of op names; forward interprets the same list (static, so fx traces it)."""

    def __init__(self, ops, widths, head):
        super().__init__()
        self.ops, self.head_kind = list(ops), head
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        c = widths[0]
        self.blocks = nn.ModuleList()
        self.in_channels = []  # static per block, so forward has no control flow on tensors
        for op, w in zip(ops, widths[1:]):
            self.in_channels.append(c)
            block, c = self._make(op, c, w)
            self.blocks.append(block)
        if head == "linear":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(c * 4, 5))
        else:
            self.head = nn.Conv2d(c, 5, 1)

    @staticmethod
    def _make(op, c, w):
        if op == "conv":
            return nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU6()), w
        if op == "depthwise":
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.Hardswish()), c
        if op == "grouped":
            g = 2 if c % 2 == 0 else 1
            return nn.Sequential(nn.Conv2d(c, 2 * g * max(w // (2 * g), 1), 3, padding=1, groups=g), nn.SiLU()), \
                2 * g * max(w // (2 * g), 1)
        if op == "residual":
            return nn.Sequential(nn.Conv2d(c, w, 1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, c, 3, padding=1),
                                 nn.BatchNorm2d(c)), c
        if op == "concat":
            return nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(c, w + 1, 3, padding=1)]), 2 * w + 1
        if op == "nested_concat":
            return nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(c, 3, 1), nn.Conv2d(w, 2, 1)]), w + c + 4
        if op == "split":
            a = max(c // 2, 1)
            return nn.ModuleList([nn.Conv2d(a, w, 1), nn.Conv2d(c - a, w, 1)]) if c > 1 else \
                nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(c, w, 1)]), w
        if op == "se":
            return nn.ModuleList([nn.Conv2d(c, max(c // 2, 1), 1), nn.Conv2d(max(c // 2, 1), c, 1)]), c
        if op == "groupnorm":
            return nn.Sequential(nn.Conv2d(c, 2 * w, 1), nn.GroupNorm(2, 2 * w), nn.GELU()), 2 * w
        if op == "chunk":  # half the channels go through a conv, the other half pass; needs even c
            return nn.Conv2d(c // 2, w, 3, padding=1) if c % 2 == 0 else nn.Identity(), (w + c // 2 if c % 2 == 0 else c)
        if op == "channels_last":  # ConvNeXt-style MLP on the last dim
            return nn.Sequential(nn.Linear(c, 2 * w), nn.GELU(), nn.Linear(2 * w, c)), c
        if op == "shuffle":  # ShuffleNet's channel shuffle (2 groups) after a grouped conv; needs even c
            if c % 2:
                return nn.Identity(), c
            return nn.Sequential(nn.Conv2d(c, 2 * max(w // 2, 1), 1, groups=2), nn.BatchNorm2d(2 * max(w // 2, 1))), \
                2 * max(w // 2, 1)
        if op == "split_attention":  # ResNeSt's split attention (radix 2), timm's layout; needs even c
            if c % 2:
                return nn.Identity(), c
            return SplitAttn(c, max(w // 2, 1), groups=1, radix=2, attn=max(w // 2, 1)), max(w // 2, 1)
        if op == "transposed":
            return nn.Sequential(nn.ConvTranspose2d(c, w, 2, stride=2), nn.BatchNorm2d(w), nn.MaxPool2d(2)), w
        raise ValueError(op)

    def forward(self, x):
        x = self.stem(x)
        for op, block, c in zip(self.ops, self.blocks, self.in_channels):
            if op == "residual":
                x = F.relu(x + block(x))
            elif op == "concat":
                x = torch.cat([block[0](x), block[1](x)], 1)
            elif op == "nested_concat":
                a = block[0](x)
                x = torch.cat([torch.cat([a, block[1](x)], 1), x], dim=1)
                x = torch.cat([block[2](a), x[:, 1:]], 1)
            elif op == "split":
                p, q = torch.split(x, [c // 2, c - c // 2], 1) if c > 1 else (x, x)
                x = block[0](p) + block[1](q)
            elif op == "chunk":
                if c % 2 == 0:
                    p, q = x.chunk(2, dim=1)
                    x = torch.cat([block(p), q], 1)
            elif op == "channels_last":
                x = x + block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            elif op == "shuffle":
                x = block(x)
                if c % 2 == 0:
                    n, ch, h, w = x.size()
                    x = x.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
            elif op == "se":
                s = torch.sigmoid(block[1](F.relu(block[0](F.adaptive_avg_pool2d(x, 1)))))
                x = x * s
            else:
                x = block(x)
        return self.head(x)


@st.composite
def random_cnn(draw):
    ops = draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=6))
    widths = draw(st.lists(st.integers(2, 9), min_size=len(ops) + 1, max_size=len(ops) + 1))
    head = draw(st.sampled_from(["linear", "conv"]))
    return ops, widths, head


@settings(max_examples=int(os.environ.get("FXPRUNE_HYPOTHESIS_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_cnn(), seed=st.integers(0, 2**16), fraction=st.floats(0.1, 0.9),
       grouped=st.sampled_from(["whole", "equal"]))
def test_random_cnn_random_keep_set(spec, seed, fraction, grouped):
    torch.manual_seed(seed)
    model = RandomCNN(*spec).eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = with_grouped(fxprune.analyze(model, x), grouped)
    rng = np.random.default_rng(seed)
    keep = {}
    for g in analysis.channels.prunable_groups:
        k = int(rng.integers(1, g.n_units + 1)) if rng.random() < fraction else g.n_units
        keep[g.index] = np.sort(rng.choice(g.n_units, k, replace=False))
    plan = PruningPlan(keep=keep)
    try:
        slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    except fxprune.FxpruneError:
        return  # a clear refusal is acceptable; a wrong model is not
    assert_close_outputs(masked_reference(analysis.channels, plan), slim, x, rtol=1e-5)
    assert measured_macs(slim, x) <= measured_macs(model, x)
    assert measured_macs(slim, x) == round(analysis.cost.macs(analysis.channels.keep_roots(keep)))
