"""Fused masked convolution: ``torch.ops.fxprune.masked_conv2d``, whose cost falls with the live channels.

During masked training (Gate Decorator, GAL) the network still carries every channel; a channel
whose mask is zero would cost its full compute in ``conv2d(x) * mask``. This op computes

    y = (conv2d(x * [in_mask != 0], weight) + bias) * out_mask[None, :, None, None]

where output channels with ``out_mask == 0`` are not computed at all and come out as exact zeros,
and input channels with ``in_mask == 0`` (optional) are skipped in the reduction (treated as zero:
pass it only where the input is known to be zero there, e.g. after a masked layer).

Implementations of the forward, chosen per call class by measuring them once (`dispatch`, like
``torch.backends.cudnn.benchmark``; `backend(name)` forces one): the live filters gathered and
convolved by cuDNN/oneDNN, written into a preallocated output (`gather`, in the input's layout or
channels_last); one dense conv with the mask folded into the filters (nearly all channels live);
a pointwise conv as one batched GEMM (`gemm`); the Triton implicit-GEMM kernel on CUDA
(`triton_conv`). The backward runs over the live channels only (`gather.backward`; measured too:
oneDNN/cuDNN's convolution backward or, for pointwise convs, GEMMs). Registration, fake
implementations, autograd and FLOP formulas: `ops`.

Gradient semantics for ``out_mask == 0`` channels (``hard=``, chosen by the method pass):

* ``hard=True`` (Gate Decorator): zero means pruned. Such a channel gets no gradient at all:
  weight rows, bias and mask entry get exactly 0.
* ``hard=False`` (GAL's FISTA step): the mask gradient is computed everywhere,
  dL/dm_c = sum(dL/dy_c * (conv(x, W_c) + b_c)), so a zeroed mask can come back. This is the exact
  derivative of ``conv2d(x) * m``; it costs a weight-gradient pass over the skipped channels.

In both modes weights and bias of a zero-mask channel get 0 (the exact derivative), x gets the
gradient through the live channels only, and `in_mask` gets no gradient (it is a selection).
Channels with a non-zero mask get the exact gradients of ``(conv2d(x, W) + b) * m``.

Example::

    >>> from fxprune.kernels import masked_conv2d
    >>> y = masked_conv2d(x, conv.weight, conv.bias, mask, stride=1, padding=1)
    >>> torch.allclose(y, conv(x) * mask[None, :, None, None], atol=1e-5)
    True
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, gather, ops
from .dispatch import backend
from .gather import conv_output_size
from .ops import cuda_backend, live_macs

triton_available = ops.triton_conv is not None


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor, stride=1, padding=0,
                  dilation=1, groups: int = 1, *, in_mask: Optional[Tensor] = None, hard: bool = True,
                  out_live: Optional[Tensor] = None, in_live: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.fxprune.masked_conv2d`` with `F.conv2d`-style int-or-pair arguments.

    `out_live` / `in_live`: the sorted indices of the masks' non-zero entries, if the caller keeps
    them (trusted as given; the op then reads no mask values: no host synchronisation on CUDA)."""
    return torch.ops.fxprune.masked_conv2d(x, weight, bias, out_mask, _pair(stride), _pair(padding),
                                           _pair(dilation), int(groups), in_mask, hard, out_live, in_live)


__all__ = ["masked_conv2d", "backend", "conv_output_size", "cuda_backend", "dispatch", "live_macs",
           "triton_available", "gather"]
