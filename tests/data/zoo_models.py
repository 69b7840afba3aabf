"""A user model listing for the zoo tests: small CNNs plus models that crash, hang or eat memory."""
import os
import time

import torch
from torch import nn


def small(width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 4, 1))


def slow_small():
    time.sleep(float(os.environ.get("FXPRUNE_TEST_SLOW_S", "3")))
    return small(12)


def crash():
    os._exit(3)


def hang():
    time.sleep(3600)


def memory_hog():
    hog = torch.ones(3 * 2**28)  # 3 GiB, touched
    time.sleep(3600)
    return hog


MODELS = {
    "small": (small, (1, 3, 16, 16)),
    "small_wide": (lambda: small(16), (1, 3, 16, 16)),
    "slow": (slow_small, (1, 3, 16, 16)),
}
BROKEN = {
    "small": (small, (1, 3, 16, 16)),
    "crash": crash,
    "hang": hang,
    "hog": memory_hog,
    "untraceable": (lambda: _Untraceable(), (1, 3, 8, 8)),
}


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)
