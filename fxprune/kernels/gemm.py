"""A pointwise (1x1, stride 1, no padding, ungrouped) convolution as one batched GEMM.

Why: such a conv *is* a matrix product, out[n] = W @ x[n] over the channels, and on the CPU the
BLAS GEMM is often much faster than oneDNN's NCHW 1x1 convolution: measured on this repo's 2-core
CPU (batch 8, float32), MobileNetV2's expand layer (24 -> 144 channels, 56x56) takes 0.27-0.49 of
the conv's time, ResNet-50's 64 -> 64 layer 0.87-0.92, and the backward 0.62-0.93 of
``convolution_backward`` (a few layers are 2-6 % slower, so the dispatcher measures rather than
assumes). The masked conv offers it as one more implementation (`gemm`, `dense_gemm`; the backward's
`gemm`); results equal ``F.conv2d`` / ``aten.convolution_backward`` up to float rounding.

NCHW tensors are read as [N, C, H*W] (a view), NHWC ones as [N*H*W, C] (a view): no layout
conversion, and the output has the input's layout, as conv2d's does.
"""
from __future__ import annotations

import torch
from torch import Tensor


def valid(x: Tensor, weight: Tensor, stride, padding, groups: int) -> bool:
    """A conv that is exactly a GEMM over channels: 1x1 filters, stride 1, no padding, one group."""
    return (weight.shape[2] == 1 and weight.shape[3] == 1 and groups == 1 and list(stride) == [1, 1]
            and list(padding) == [0, 0] and x.dtype.is_floating_point)


def _channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rows(t: Tensor) -> Tensor:
    """An NHWC tensor as its [N*H*W, C] matrix (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a pointwise conv, computed as a GEMM, in x's layout.

    The GEMM writes into the output's own [N, C, H*W] / [N*H*W, C] view (``out=``), and the output
    itself is returned, not a view of a GEMM result: the masked conv op's output must not be a view
    (autograd forbids an in-place op, a ``ReLU(inplace=True)`` after it, on a custom function's view
    output)."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    w2 = weight.reshape(cout, cin)
    if _channels_last(x):
        y = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        if bias is None:
            torch.mm(_rows(x), w2.t(), out=_rows(y))
        else:
            torch.addmm(bias, _rows(x), w2.t(), out=_rows(y))
        return y
    y = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device)
    x3, y3, w3 = x.reshape(n, cin, h * w), y.view(n, cout, h * w), w2.expand(n, cout, cin)
    if bias is None:
        torch.bmm(w3, x3, out=y3)
    else:
        torch.baddbmm(bias.reshape(1, cout, 1), w3, x3, out=y3)
    return y


def conv1x1_backward(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool):
    """(dL/dx, dL/dW) of `conv1x1` (None where not needed); dL/dx in x's layout."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    w2 = weight.reshape(cout, cin)
    gx = gw = None
    if _channels_last(x):
        g2, x2 = _rows(grad), _rows(x)
        if need_x:
            gx = (g2 @ w2).view(n, h, w, cin).permute(0, 3, 1, 2)
        if need_w:
            gw = (g2.t() @ x2).reshape(weight.shape)
        return gx, gw
    g3 = grad.reshape(n, cout, h * w)
    if need_x:
        gx = torch.matmul(w2.t(), g3).view(n, cin, h, w)
    if need_w:
        per_sample = torch.bmm(g3, x.reshape(n, cin, h * w).transpose(1, 2))  # [N, Cout, Cin]
        acc = torch.promote_types(weight.dtype, torch.float32)  # summed over the batch in float32 at least
        gw = per_sample.sum(0, dtype=acc).to(weight.dtype).reshape(weight.shape)
    return gx, gw
