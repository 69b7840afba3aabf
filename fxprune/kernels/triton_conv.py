"""Triton forward kernels of the masked conv: implicit GEMM on tensor cores over the live channels only.

Nothing here synchronises with the host. The launcher orders each group's output channels live
first (`perm`) and counts them (`count`) on the device, and packs the filters in that order; the
grid covers every channel tile, and a program whose tile starts past its group's count writes zeros
instead of computing. So grid and shapes are static, every computing tile but the last one of a
group is full of live channels, and dead channels come out as exact zeros without a memset. An
input-channel mask is compacted the same way: the reduction runs over the live input channels only.

Two kernels:

* `_igemm_kernel` (ungrouped convs and grouped convs with >= 16 output channels per group): a
  [pixels x channels] tile accumulated with `tl.dot` (tensor cores: fp16/bf16 inputs with fp32
  accumulation; fp32 inputs as TF32 exactly when cuDNN convolutions are allowed to,
  ``torch.backends.cudnn.allow_tf32``). The reduction runs tap by tap (the input position is
  computed once per tap, not per element) and, inside a tap, over blocks of input channels; with
  channels_last (NHWC) activations those loads are contiguous. Filters are packed per call as
  [group, tap, input channel (live first), output channel (live first)], so weight tiles are
  contiguous too. Epilogue: bias, mask scale, optional per-channel affine (an eval-mode
  BatchNorm) and ReLU, in fp32, stored in the output dtype.
  On a GPU the block sizes, warps and stages are chosen by `triton.autotune`, keyed on the shape.
  Under ``TRITON_INTERPRET=1`` one fixed configuration runs, and bf16 tiles are upcast to fp32
  before `tl.dot` (numpy has no bfloat16); on a GPU they go to the MMA as bf16.
* `_direct_kernel` (depthwise and small-group convs, where a dot tile would be mostly padding):
  per-channel FMAs over the group's input channels and taps.

Loop bounds are compile-time constants (`tl.constexpr`): Triton 3.6's interpreter turns runtime
scalars into one-element numpy arrays, which ``range()`` cannot take under NumPy >= 2.4
("only 0-dimensional arrays can be converted to Python scalars"). Runtime counts (live input
channels) guard the loop body instead.

Inputs may have any strides (NCHW or NHWC); the output has the input's memory format.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gather import conv_output_size, output_format


@triton.jit
def _pixels(pid_m, N, OH, OW, BLOCK_M: tl.constexpr):
    """The tile's output pixels: in-range flag, image (int64), row and column."""
    P = OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix = offs_m % P
    return offs_m < N * P, (offs_m // P).to(tl.int64), pix // OW, pix % OW


@triton.jit
def _epilogue(acc, y_ptr, y_off, out_ok, m_ptr, b_ptr, s_ptr, t_ptr, ch, n_ok, live,
              HAS_BIAS: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr):
    """((acc + bias) * mask) [* scale + shift] [relu], exact zeros outside the live channels."""
    mval = tl.load(m_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * mval[None, :]
    if AFFINE:
        sc = tl.load(s_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)
        sh = tl.load(t_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * sc[None, :] + sh[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = tl.where(live[None, :], acc, 0.0)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _igemm_kernel(x_ptr, wp_ptr, b_ptr, m_ptr, s_ptr, t_ptr, perm_ptr, cnt_ptr, ich_ptr, icnt_ptr, y_ptr,
                  N, H, W, OH, OW,
                  sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  IPG: tl.constexpr, OPG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  HAS_BIAS: tl.constexpr, IN_MASK: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        if IN_MASK:
            c_end = tl.load(icnt_ptr + g)
        else:
            c_end = IPG
        offs_k0 = tl.arange(0, BLOCK_K)
        for t in range(0, KH * KW):
            ih = ih0 + (t // KW) * dil_h
            iw = iw0 + (t % KW) * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = x_img + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = wp_ptr + (g * (KH * KW) + t).to(tl.int64) * (IPG * OPG)
            for c0 in range(0, IPG, BLOCK_K):
                if c0 < c_end:
                    offs_k = c0 + offs_k0
                    k_ok = offs_k < c_end
                    if IN_MASK:
                        cin = tl.load(ich_ptr + g * IPG + offs_k, mask=k_ok, other=0)
                    else:
                        cin = g * IPG + offs_k
                    a = tl.load(x_ptr + x_row[:, None] + (cin.to(tl.int64) * sxc)[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_tap + offs_k[:, None] * OPG + offs_n[None, :],
                                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
        _epilogue(acc, y_ptr, y_off, out_ok, m_ptr, b_ptr, s_ptr, t_ptr, ch, n_ok, offs_n < cnt,
                  HAS_BIAS, AFFINE, RELU)
    else:
        tl.store(y_ptr + y_off, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=out_ok)


def _configs():
    """Tile shapes for the autotuner: pixels x channels x reduction block, warps, pipeline stages."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in ((128, 64, 32, 4, 3), (64, 64, 32, 4, 4), (128, 128, 32, 8, 3),
                                              (64, 32, 64, 4, 3))]


def _prune(configs, named_args, **kwargs):
    """Drop tiles wider than the group's channels (pure padding) and deep K blocks on thin inputs."""
    opg, ipg = named_args.get("OPG", kwargs.get("OPG")), named_args.get("IPG", kwargs.get("IPG"))
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(opg))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(ipg))]
    return keep or configs[:1]


_igemm_tuned = triton.autotune(configs=_configs(), prune_configs_by={"early_config_prune": _prune},
                               key=["N", "H", "W", "OH", "OW", "IPG", "OPG", "KH", "KW", "PRECISION", "IN_MASK"])(
    _igemm_kernel)


@triton.jit
def _direct_kernel(x_ptr, w_ptr, b_ptr, m_ptr, s_ptr, t_ptr, perm_ptr, cnt_ptr, ia_ptr, y_ptr,
                   N, H, W, OH, OW, C_OUT,
                   sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   IPG: tl.constexpr, OPG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IN_MASK: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr,
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
                    wv = tl.load(w_ptr + ch.to(tl.int64) * (IPG * KH * KW) + (ci * KH + kh) * KW + kw,
                                 mask=col_ok, other=0.0)
                    acc += a.to(tl.float32) * wv.to(tl.float32)[None, :]
        _epilogue(acc, y_ptr, y_off, out_ok, m_ptr, b_ptr, s_ptr, t_ptr, ch, n_ok, offs_n < cnt,
                  HAS_BIAS, AFFINE, RELU)
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


def _pack(weight: Tensor, perm: Tensor, iperm_local: Tensor | None, groups: int) -> Tensor:
    """Filters as [group, tap, input channel, output channel], both channel axes in live-first order."""
    cout, ipg, kh, kw = weight.shape
    opg = cout // groups
    w = weight.index_select(0, perm.long()).reshape(groups, opg, ipg, kh * kw)
    if iperm_local is not None:
        w = torch.gather(w, 2, iperm_local.long().reshape(groups, 1, ipg, 1).expand(groups, opg, ipg, kh * kw))
    return w.permute(0, 3, 2, 1).contiguous()


def _interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (decided by triton when the kernels were decorated)."""
    return type(_igemm_kernel).__name__ == "InterpretedFunction"


def uses_gemm(cin: int, cout: int, kh: int, kw: int, groups: int) -> bool:
    """The tensor-core kernel for ungrouped convs and groups of >= 16 output channels, else direct."""
    return groups == 1 or (cout // groups >= 16 and (cin // groups) * kh * kw >= 16)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


# the configuration run under the interpreter (no autotuning there: it times on a GPU)
INTERPRETED_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}


def masked_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, out_mask: Tensor, in_mask: Tensor | None,
                  stride, padding, dilation, groups: int, *, scale: Tensor | None = None,
                  shift: Tensor | None = None, relu: bool = False, config: dict | None = None) -> Tensor:
    """Launch the forward kernel (no host synchronisation); same semantics as `gather.forward`.

    `scale`/`shift` (per output channel, both or neither) and `relu` apply after the mask:
    ``relu(((conv + b) * m) * scale + shift)`` on live channels (an eval BatchNorm and its ReLU);
    dead channels stay exact zeros. `config` forces the block sizes (skips autotuning).
    """
    n, cin, h, w_ = x.shape
    cout, ipg, kh, kw = weight.shape
    oh, ow = conv_output_size(h, w_, kh, kw, stride, padding, dilation)
    y = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=output_format(x))
    if y.numel() == 0:
        return y
    opg = cout // groups
    has_bias = bias is not None
    affine = scale is not None
    b = bias if has_bias else out_mask  # a valid pointer, never read
    s = scale if affine else out_mask
    t = shift if affine else out_mask
    geometry = (*x.stride(), *y.stride(), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    m_total = n * oh * ow
    in_active = None if in_mask is None else in_mask != 0
    flags = dict(IPG=ipg, OPG=opg, KH=kh, KW=kw, HAS_BIAS=has_bias, IN_MASK=in_active is not None,
                 AFFINE=affine, RELU=bool(relu))
    if uses_gemm(cin, cout, kh, kw, groups):
        perm, cnt = _compact(out_mask != 0, groups)
        if in_active is not None:
            iperm, icnt = _compact(in_active, groups, local=True)
            ich = (iperm.reshape(groups, ipg) + torch.arange(groups, device=x.device)[:, None] * ipg).reshape(-1)
            ich = ich.to(torch.int32)
        else:
            iperm, icnt, ich = None, cnt, perm  # valid pointers, never read
        wp = _pack(weight, perm, iperm, groups)
        args = (x, wp, b, out_mask, s, t, perm, cnt, ich, icnt, y, n, h, w_, oh, ow, *geometry)
        flags.update(PRECISION=_precision(x.dtype), UPCAST=x.dtype == torch.bfloat16 and _interpreted())
        if config is None and not _interpreted():
            grid = lambda meta: (triton.cdiv(m_total, meta["BLOCK_M"]), triton.cdiv(opg, meta["BLOCK_N"]), groups)
            _igemm_tuned[grid](*args, **flags)
        else:
            conf = dict(INTERPRETED_CONFIG, **(config or {}))
            grid = (triton.cdiv(m_total, conf["BLOCK_M"]), triton.cdiv(opg, conf["BLOCK_N"]), groups)
            _igemm_kernel[grid](*args, **flags, **conf, num_warps=4)
    else:
        perm, cnt = _compact(out_mask != 0, 1)
        ia = in_active.to(torch.int8) if in_active is not None else perm
        block_m, block_n = 64, 32
        grid = (triton.cdiv(m_total, block_m), triton.cdiv(cout, block_n))
        _direct_kernel[grid](
            x, weight.contiguous(), b, out_mask, s, t, perm, cnt, ia, y, n, h, w_, oh, ow, cout, *geometry,
            **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y
