"""Small models whose channels carry a structure (g blocks of width w): channel shuffle, split
attention (radix softmax), unflatten/view splits with literal sizes. Built with random weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x, groups: int):
    """torchvision's: sizes read at run time, `num_channels // groups` computed."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class Shuffle(nn.Module):
    def __init__(self, groups=3, literal=False):
        super().__init__()
        self.groups, self.literal = groups, literal
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.b = nn.Conv2d(24, 24, 3, padding=1)
        self.c = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        if self.literal:  # size literals, as a hand-written model has them
            n = y.shape[0]
            y = y.view(n, 3, 8, 8, 8).transpose(1, 2).reshape(n, 24, 8, 8)
        else:
            y = channel_shuffle(y, self.groups)
        return self.c(torch.relu(self.b(y)))


class RadixSoftmax(nn.Module):
    def __init__(self, radix, cardinality):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality

    def forward(self, x):
        batch = x.size(0)
        x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
        x = F.softmax(x, dim=1)
        return x.reshape(batch, -1)


class SplitAttn(nn.Module):
    """timm's SplitAttn (ResNeSt): a conv of radix * C channels, the radix splits summed, a softmax
    over the radix axis weighs them."""

    def __init__(self, cin, cout, groups=1, radix=2, attn=16):
        super().__init__()
        self.radix = radix
        mid = cout * radix
        self.conv = nn.Conv2d(cin, mid, 3, padding=1, groups=groups * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(mid)
        self.fc1 = nn.Conv2d(cout, attn, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(attn)
        self.fc2 = nn.Conv2d(attn, mid, 1, groups=groups)
        self.rsoftmax = RadixSoftmax(radix, groups)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(x)))
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        gap = torch.relu(self.bn1(self.fc1(gap)))
        attn = self.rsoftmax(self.fc2(gap)).view(B, -1, 1, 1)
        return (x * attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)


class SplitAttnNet(nn.Module):
    """Two ResNeSt-style bottlenecks (1x1, split attention, 1x1, residual) and a classifier."""

    def __init__(self, groups=2, radix=2):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({
                "conv1": nn.Conv2d(32, 32, 1), "bn1": nn.BatchNorm2d(32),
                "attn": SplitAttn(32, 32, groups=groups, radix=radix),
                "conv3": nn.Conv2d(32, 32, 1), "bn3": nn.BatchNorm2d(32)}))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            y = torch.relu(b["bn1"](b["conv1"](x)))
            y = b["bn3"](b["conv3"](b["attn"](y)))
            x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


class Unflattens(nn.Module):
    """unflatten (method and nn.Unflatten) with literal sizes, a per-block sum over the group axis
    and a flatten back."""

    def __init__(self, module=False):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 1)
        self.split = nn.Unflatten(1, (4, 8)) if module else None
        self.c = nn.Conv2d(8, 6, 1)
        self.d = nn.Conv2d(32, 6, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.split(y) if self.split is not None else y.unflatten(1, (4, 8))  # N, 4, 8, H, W
        s = z.softmax(dim=1).sum(1)  # over the group axis
        return self.c(s) + self.d(z.flatten(1, 2))
