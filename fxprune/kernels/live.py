"""Which channels of a mask are live: read once per call and shared by everything the call does.

Why one object: the forward needs the live indices (to gather), their count (for the dispatcher's
density bucket), whether every live value is exactly 1 (a 0/1 mask needs no filter scaling), the
dead indices (to write the output). On CUDA each would be
a device read; `Live` copies the (small) mask to the host once, derives everything there, and moves
the index tensors back to the device without waiting.

Not cached across calls on purpose: masks are changed through ``.data`` (gradcheck, user code),
which the version counter does not see, so a cache keyed on it could return a stale live set.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class Live:
    """The live (non-zero) entries of a mask: sorted indices (on the mask's device) and their count."""

    mask: Tensor
    host: Tensor  # the mask's values on the CPU
    count: int

    @property
    def total(self) -> int:
        return self.mask.numel()

    @property
    def density(self) -> float:
        return self.count / max(self.total, 1)

    def _device(self, t: Tensor) -> Tensor:
        return t if self.mask.device.type == "cpu" else t.to(self.mask.device, non_blocking=True)

    @cached_property
    def host_idx(self) -> Tensor:
        return (self.host != 0).nonzero().reshape(-1)

    @cached_property
    def idx(self) -> Tensor:
        return self._device(self.host_idx)

    @cached_property
    def all_ones(self) -> bool:
        """Every live value is exactly 1 (a 0/1 mask needs no scaling of the live filters)."""
        return bool((self.host.index_select(0, self.host_idx) == 1).all())

    @cached_property
    def flags(self) -> Tensor:
        return self._device(self.host != 0)

    @cached_property
    def dead_idx(self) -> Tensor:
        return self._device((self.host == 0).nonzero().reshape(-1))


def live(mask: Tensor) -> Live:
    """The live channels of `mask` (a 1-D tensor): one read of its values."""
    host = mask.detach()
    if host.device.type != "cpu":
        host = host.to("cpu")
    return Live(mask, host, int(torch.count_nonzero(host)))
