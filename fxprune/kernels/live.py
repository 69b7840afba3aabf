"""Which channels of a mask are live: read once per call and shared by everything the call does.

Why one object: the forward needs the live indices (to gather), their count (for the dispatcher's
density bucket), whether every live value is exactly 1 (a 0/1 mask needs no filter scaling), the
dead indices (to write the output). On CUDA each would be
a device read; `Live` copies the (small) mask to the host once, derives everything there, and moves
the index tensors back to the device without waiting.

Not cached across calls here on purpose: masks are changed through ``.data`` (gradcheck, user
code), which the version counter does not see, so a cache keyed on it could return a stale live
set. A caller that knows its masks are only written in ways that bump their versions (the fused
pass with ``cache_live=True``: fxprune's methods) remembers the live indices itself
(`passes.compact_chain.LiveChannels`) and hands them to the op (`given`): then nothing here reads
the mask, so the op makes the host wait for the device at no point (and a CUDA graph can capture it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class Live:
    """The live (non-zero) entries of a mask: sorted indices (on the mask's device) and their count.

    `host`: the mask's values on the CPU, or None when the caller handed the live indices (`given`)
    and the mask was not read; then whether the live values are all 1 and which channels are dead
    are not known without a read, and the users take the paths that do not need them."""

    mask: Tensor
    host: Tensor | None
    count: int
    host_idx: Tensor | None = None  # the live indices on the CPU (from `host`)
    given: Tensor | None = None  # the live indices as the caller handed them (on the mask's device)

    @property
    def total(self) -> int:
        return self.mask.numel()

    @property
    def density(self) -> float:
        return self.count / max(self.total, 1)

    def _device(self, t: Tensor) -> Tensor:
        return t if self.mask.device.type == "cpu" else t.to(self.mask.device, non_blocking=True)

    @cached_property
    def idx(self) -> Tensor:
        return self.given if self.given is not None else self._device(self.host_idx)

    @cached_property
    def all_ones(self) -> bool:
        """Every live value is exactly 1 (a 0/1 mask needs no scaling of the live filters); False
        when the mask was not read (scaling by a 1 is exact, so only the cost of a small multiply differs)."""
        if self.host is None:
            return False
        return int(torch.count_nonzero(self.host == 1)) == self.count

    @cached_property
    def flags(self) -> Tensor:
        if self.host is None:
            return torch.zeros(self.total, dtype=torch.bool, device=self.mask.device).index_fill_(0, self.idx, True)
        return self._device(self.host != 0)

    @cached_property
    def dead_idx(self) -> Tensor | None:
        """The dead channels' indices on the mask's device; None when the mask was not read."""
        if self.host is None:
            return None
        return self._device((self.host == 0).nonzero().reshape(-1))


def live(mask: Tensor, given: Tensor | None = None) -> Live:
    """The live channels of `mask` (a 1-D tensor): one read of its values, or none when `given`
    (the sorted live indices, trusted: the fused pass's remembered live sets) is handed over."""
    if given is not None:
        return Live(mask, None, given.numel(), given=given)
    host = mask.detach()
    if host.device.type != "cpu":
        host = host.to("cpu")
    idx = host.nonzero().reshape(-1)
    return Live(mask, host, idx.numel(), host_idx=idx)
