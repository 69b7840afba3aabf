"""Triton forward kernels of the masked conv: implicit GEMM over the active output channels only.

Nothing here synchronises with the host. The launcher sorts each group's output channels so the
active ones come first (`perm`) and counts them (`count`) on the device; the grid covers every
channel tile, and a program whose tile starts past its group's count writes zeros instead of
computing. So the grid and all shapes are static, compute falls with the number of live channels,
and masked channels come out as exact zeros without a separate memset. An input-channel mask is
compacted the same way: the reduction (K) loop runs over the live input channels only.

Two kernels:

* `_gemm_kernel` (``groups == 1`` and grouped convs with at least 16 channels per group and
  K >= 16): a [pixels x channels] tile accumulated with `tl.dot` over K = live input channels x
  KH x KW, per group (grid axis 2); bias and mask scale in the epilogue; fp32 accumulation.
  (Triton's interpreter cannot `tl.dot` bfloat16 (numpy has no bfloat16), so under
  ``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 first; on a GPU they go to the MMA as bf16.)
* `_direct_kernel` (depthwise and small-group convs, where a dot product would be mostly padding):
  per-channel FMAs over the group's input channels and taps, each live channel reading its own
  input channels; an input mask zeroes the skipped input columns.

Inputs are NCHW with any strides; weights are made contiguous; the output is contiguous NCHW.
fp32 inputs use TF32 in `tl.dot` exactly when cuDNN convolutions do
(``torch.backends.cudnn.allow_tf32``), so the kernel matches `F.conv2d`'s default precision.

Block sizes are fixed heuristics (below), not autotuned: they have not been tuned on a GPU yet.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (that is how CI checks them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gather import conv_output_size


@triton.jit
def _pixels(pid_m, N, OH, OW, BLOCK_M: tl.constexpr):
    """The tile's output pixels: in-range flag, image (int64), row and column."""
    P = OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix = offs_m % P
    return offs_m < N * P, (offs_m // P).to(tl.int64), pix // OW, pix % OW


@triton.jit
def _epilogue(acc, y_ptr, y_off, out_ok, m_ptr, b_ptr, ch, n_ok, live, HAS_BIAS: tl.constexpr):
    """(acc + bias) * mask, exact zeros outside the live channels, stored in the output dtype."""
    scale = tl.load(m_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(live[None, :], acc * scale[None, :], 0.0)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, b_ptr, m_ptr, perm_ptr, cnt_ptr, iperm_ptr, icnt_ptr, y_ptr,
                 N, H, W, OH, OW, IPG, OPG, K_FULL,
                 sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, IN_MASK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    n_start = pid_n * BLOCK_N
    cnt = tl.load(cnt_ptr + g)
    m_ok, img, oh, ow = _pixels(pid_m, N, OH, OW, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OPG
    ch = tl.load(perm_ptr + g * OPG + offs_n, mask=n_ok, other=0)
    y_off = img[:, None] * syn + ch[None, :].to(tl.int64) * syc + (oh * syh + ow * syw)[:, None]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if n_start < cnt:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        x_img = img * sxn
        taps = KH * KW
        if IN_MASK:
            k_end = tl.load(icnt_ptr + g) * taps
        else:
            k_end = IPG * taps
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            slot = offs_k // taps
            r = offs_k % taps
            if IN_MASK:
                cin_local = tl.load(iperm_ptr + g * IPG + slot, mask=k_ok, other=0)
            else:
                cin_local = slot
            kh = r // KW
            kw = r % KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            cin = g * IPG + cin_local
            a = tl.load(x_ptr + x_img[:, None] + (cin.to(tl.int64) * sxc)[None, :] + ih * sxh + iw * sxw,
                        mask=a_ok, other=0.0)
            wk = cin_local * taps + r
            b = tl.load(w_ptr + ch[None, :].to(tl.int64) * K_FULL + wk[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        _epilogue(acc, y_ptr, y_off, out_ok, m_ptr, b_ptr, ch, n_ok, offs_n < cnt, HAS_BIAS)
    else:
        tl.store(y_ptr + y_off, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _direct_kernel(x_ptr, w_ptr, b_ptr, m_ptr, perm_ptr, cnt_ptr, ia_ptr, y_ptr,
                   N, H, W, OH, OW, IPG, OPG, C_OUT, K_FULL,
                   sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, IN_MASK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_start = pid_n * BLOCK_N
    cnt = tl.load(cnt_ptr)
    m_ok, img, oh, ow = _pixels(pid_m, N, OH, OW, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_OUT
    ch = tl.load(perm_ptr + offs_n, mask=n_ok, other=0)
    y_off = img[:, None] * syn + ch[None, :].to(tl.int64) * syc + (oh * syh + ow * syw)[:, None]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if n_start < cnt:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        cin0 = (ch // OPG) * IPG
        live_n = n_ok & (offs_n < cnt)
        for ci in range(0, IPG):
            cin = cin0 + ci
            col_ok = live_n
            if IN_MASK:
                col_ok = col_ok & (tl.load(ia_ptr + cin, mask=live_n, other=0) != 0)
            x_ch = (cin.to(tl.int64) * sxc)[None, :]
            for kh in tl.static_range(KH):
                for kw in tl.static_range(KW):
                    ih = ih0 + kh * dil_h
                    iw = iw0 + kw * dil_w
                    row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    a = tl.load(x_ptr + (img * sxn + ih * sxh + iw * sxw)[:, None] + x_ch,
                                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                    wv = tl.load(w_ptr + ch.to(tl.int64) * K_FULL + (ci * KH + kh) * KW + kw,
                                 mask=col_ok, other=0.0)
                    acc += a.to(tl.float32) * wv.to(tl.float32)[None, :]
        _epilogue(acc, y_ptr, y_off, out_ok, m_ptr, b_ptr, ch, n_ok, offs_n < cnt, HAS_BIAS)
    else:
        tl.store(y_ptr + y_off, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=out_ok)


def _compact(active: Tensor, groups: int, local: bool = False) -> tuple[Tensor, Tensor]:
    """Per group: channel indices with the active ones first (stable), and the active counts.

    Indices are global (channel numbers) or, with `local`, positions inside the group.
    """
    per = active.reshape(groups, -1)
    order = torch.argsort((~per).to(torch.uint8), dim=1, stable=True)
    if not local:
        order = order + torch.arange(groups, device=active.device)[:, None] * per.shape[1]
    return order.reshape(-1).to(torch.int32), per.sum(1, dtype=torch.int32)


def _interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (decided by triton when the kernels were decorated)."""
    return type(_gemm_kernel).__name__ == "InterpretedFunction"


def uses_gemm(cin: int, cout: int, kh: int, kw: int, groups: int) -> bool:
    opg, ipg = cout // groups, cin // groups
    return groups == 1 or (opg >= 16 and ipg * kh * kw >= 16)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def masked_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, out_mask: Tensor, in_mask: Tensor | None,
                  stride, padding, dilation, groups: int) -> Tensor:
    """Launch the forward kernel (no host synchronisation); same semantics as `gather.forward`."""
    n, cin, h, w_ = x.shape
    cout, ipg, kh, kw = weight.shape
    oh, ow = conv_output_size(h, w_, kh, kw, stride, padding, dilation)
    y = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    wc = weight.contiguous()
    opg = cout // groups
    has_bias = bias is not None
    b = bias if has_bias else out_mask  # a valid pointer, never read
    geometry = (*x.stride(), *y.stride(), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    m_total = n * oh * ow
    in_active = None if in_mask is None else in_mask != 0
    if uses_gemm(cin, cout, kh, kw, groups):
        perm, cnt = _compact(out_mask != 0, groups)
        iperm, icnt = _compact(in_active, groups, local=True) if in_active is not None else (perm, cnt)
        block_m = 64 if m_total >= 64 else 32
        block_n = 64 if opg >= 64 else 32 if opg >= 32 else 16
        block_k = 32
        grid = (triton.cdiv(m_total, block_m), triton.cdiv(opg, block_n), groups)
        _gemm_kernel[grid](
            x, wc, b, out_mask, perm, cnt, iperm, icnt, y, n, h, w_, oh, ow, ipg, opg, ipg * kh * kw, *geometry,
            KH=kh, KW=kw, HAS_BIAS=has_bias, IN_MASK=in_active is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION=_precision(x.dtype), UPCAST=x.dtype == torch.bfloat16 and _interpreted(), num_warps=4)
    else:
        perm, cnt = _compact(out_mask != 0, 1)
        ia = in_active.to(torch.int8) if in_active is not None else perm
        block_m, block_n = 64, 32
        grid = (triton.cdiv(m_total, block_m), triton.cdiv(cout, block_n))
        _direct_kernel[grid](
            x, wc, b, out_mask, perm, cnt, ia, y, n, h, w_, oh, ow, ipg, opg, cout, ipg * kh * kw, *geometry,
            KH=kh, KW=kw, HAS_BIAS=has_bias, IN_MASK=in_active is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y
