"""Masked conv by gather / compute / scatter with stock PyTorch ops (the CPU path; any device).

Forward: gather the filters of the active output channels (scaled by their mask), convolve, and
scatter the result into an output whose other channels are filled with exact zeros. The mask and
the bias are folded into the gathered filters (``conv(x, W*m) + b*m``), so the epilogue costs no
extra pass over the output. An input-channel mask gathers the live input channels as well.

Grouped convs gather whole groups: a group with at least one active output channel is computed
(its masked channels get zero filters), a group without any is skipped. For depthwise convs
(one output channel per group) that is exactly the active channels.

Backward (`backward`): one ``aten.convolution_backward`` over the gathered tensors gives the
input gradient and dL/dW' for the effective filters W' = W*m; then dW = m * dL/dW',
dm = <W, dL/dW'> + b * sum(dL/dy) (the mask gradient falls out of the weight gradient, so no
forward activations are saved) and db = m * sum(dL/dy). In soft mode the mask gradient of the
skipped channels is computed by a second, weight-gradient-only call over them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gemm as gemm_conv
from .live import Live, live


def conv_output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


@dataclass
class Selection:
    """What the gathered conv computes for a set of output channels.

    out_idx / in_idx: gathered output / input channels (None: all of them, nothing gathered);
    groups: the gathered conv's groups; col_flag: [n_out, in/groups] 0/1 multipliers of the
    gathered filters' input columns (grouped convs with an input mask), or None; gather_cols:
    in_idx also selects the filters' input columns (ungrouped convs).
    """

    out_idx: Tensor | None
    in_idx: Tensor | None
    groups: int
    col_flag: Tensor | None
    n_out: int
    gather_cols: bool = False


def _nonzero(flags: Tensor) -> Tensor:
    return flags.nonzero().reshape(-1)


def select(chans: Tensor, in_active: Tensor | None, groups: int, cin: int, cout: int) -> Selection:
    """The gathered conv that computes the output channels flagged in `chans` (bool, [cout])."""
    if groups == 1:
        out_idx = _nonzero(chans)
        n = out_idx.numel()
        out_idx = None if n == cout else out_idx
        in_idx = None
        if in_active is not None:
            in_idx = _nonzero(in_active)
            in_idx = None if in_idx.numel() == cin else in_idx
        return Selection(out_idx, in_idx, 1, None, n, gather_cols=in_idx is not None)
    opg, ipg = cout // groups, cin // groups
    live = _nonzero(chans.reshape(groups, opg).any(1))
    n_groups = live.numel()
    col_flag = None
    if in_active is not None and not bool(in_active.all()):
        col_flag = in_active.reshape(groups, ipg)[live].repeat_interleave(opg, 0)
    if n_groups == groups:
        return Selection(None, None, groups, col_flag, cout)
    out_idx = (live[:, None] * opg + torch.arange(opg, device=live.device)).reshape(-1)
    in_idx = (live[:, None] * ipg + torch.arange(ipg, device=live.device)).reshape(-1)
    return Selection(out_idx, in_idx, n_groups, col_flag, n_groups * opg)


def _gathered(sel: Selection, x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor):
    """Gathered input, effective filters W' (gathered, input-masked), bias and mask."""
    w = weight if sel.out_idx is None else weight.index_select(0, sel.out_idx)
    m = mask if sel.out_idx is None else mask.index_select(0, sel.out_idx)
    b = None if bias is None else (bias if sel.out_idx is None else bias.index_select(0, sel.out_idx))
    xs = gather_channels(x, sel.in_idx)
    if sel.gather_cols:
        w = w.index_select(1, sel.in_idx)
    if sel.col_flag is not None:
        w = w * sel.col_flag[:, :, None, None].to(w.dtype)
    return xs, w, b, m


def _active(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask != 0


def output_format(x: Tensor) -> torch.memory_format:
    """The memory format of the op's output: channels_last exactly when the input is (like conv2d)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def select_live(out: Live, in_: Live | None, groups: int, cin: int, cout: int) -> Selection:
    """`select` from remembered live sets: no device read for ungrouped and depthwise convs."""
    if groups == 1:
        out_idx = None if out.count == cout else out.idx
        in_idx = None if in_ is None or in_.count == cin else in_.idx
        return Selection(out_idx, in_idx, 1, None, out.count, gather_cols=in_idx is not None)
    if groups == cin == cout and (in_ is None or in_.count == cin):  # depthwise: the live channels
        idx = None if out.count == cout else out.idx
        return Selection(idx, idx, out.count, None, out.count)
    return select(out.flags, None if in_ is None else in_.flags, groups, cin, cout)


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, out_mask: Tensor, in_mask: Tensor | None,
            stride, padding, dilation, groups: int, *, channels_last: bool = False, zero_row: bool = False,
            gemm: bool = False, out_live: Live | None = None, in_live: Live | None = None) -> Tensor:
    """Convolve the live filters only and write them into a preallocated output (dead channels: zeros).

    `channels_last` runs the gathered conv in NHWC (oneDNN/cuDNN are often faster there) and writes
    the result into the output's own layout in the same pass that places the channels.

    `zero_row` (ungrouped convs, NCHW output) builds the output with a single ``index_select`` over
    channels from the compact result plus one zero plane (dead channels read it): one op writing the
    output at memcpy speed, instead of one copy or fill per run of live/dead channels. The zero
    plane comes from one extra all-zero filter where that fits in the last channel block (exact for
    finite inputs; an infinite input gives NaN there, like conv * 0), else from appending zeros.

    `gemm` (pointwise convs, `gemm.valid`) computes the gathered conv as one batched GEMM.
    """
    n, cin, h, w_ = x.shape
    cout, _, kh, kw = weight.shape
    oh, ow = conv_output_size(h, w_, kh, kw, stride, padding, dilation)
    fmt = output_format(x)
    out_live = out_live if out_live is not None else live(out_mask)
    in_live = in_live if in_live is not None or in_mask is None else live(in_mask)
    sel = select_live(out_live, in_live, groups, cin, cout)
    if sel.n_out == 0:
        return torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
    xs, ws, bs, ms = _gathered(sel, x, weight, bias, out_mask)
    exact = sel.n_out == out_live.count  # gathered exactly the live channels (not whole groups)
    if not (exact and out_live.all_ones):  # a 0/1 mask (Gate Decorator) needs no scaling of the live filters
        ws = ws * ms.reshape(-1, 1, 1, 1)
        bs = None if bs is None else bs * ms
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    if (zero_row and sel.groups == 1 and sel.out_idx is not None and xs.shape[1]
            and fmt == torch.contiguous_format):
        if sel.n_out % CHANNEL_BLOCK:  # the zero filter fits in the last, partly used channel block
            ws = torch.cat([ws, ws.new_zeros((1, *ws.shape[1:]))])
            bs = None if bs is None else torch.cat([bs, bs.new_zeros(1)])
            z = F.conv2d(xs, ws, bs, stride, padding, dilation, 1)
        else:  # a whole new block would cost 16 channels of compute: append a zero plane instead
            z = F.conv2d(xs, ws, bs, stride, padding, dilation, 1)
            z = torch.cat([z, z.new_zeros((n, 1, oh, ow))], 1)
        where = torch.full((cout,), sel.n_out, dtype=torch.long, device=x.device)
        where[sel.out_idx] = torch.arange(sel.n_out, device=x.device)
        return z.index_select(1, where)
    if xs.shape[1] == 0:  # every input channel masked: only the bias is left
        z = torch.zeros((n, ws.shape[0], oh, ow), dtype=x.dtype, device=x.device)
        z = z if bs is None else z + bs.reshape(1, -1, 1, 1)
    elif gemm:
        z = gemm_conv.conv1x1(xs, ws, bs)
    else:
        z = F.conv2d(xs, ws, bs, stride, padding, dilation, sel.groups)
    if sel.out_idx is None:
        return z.contiguous(memory_format=fmt)
    return _scatter_channels(z, sel.out_idx, cout, fmt, out_live if groups == 1 or sel.groups == sel.n_out else None)


def dense_forward(x: Tensor, weight: Tensor, bias: Tensor | None, out_mask: Tensor, in_mask: Tensor | None,
                  stride, padding, dilation, groups: int, *, gemm: bool = False) -> Tensor:
    """Every channel computed, the mask folded into the filters: conv(x, W * m) + b * m.

    The fastest choice when nearly all channels are live (one conv, no gather, no scatter). A dead
    channel's filter is all zeros, so it comes out as exact zeros for finite inputs.
    """
    cout, ipg = weight.shape[:2]
    scale = out_mask.reshape(-1, 1, 1, 1)
    if in_mask is not None:
        cols = (in_mask != 0).reshape(groups, ipg).repeat_interleave(cout // groups, 0)
        scale = scale * cols[:, :, None, None].to(weight.dtype)
    wm = weight * scale
    bm = None if bias is None else bias * out_mask
    y = gemm_conv.conv1x1(x, wm, bm) if gemm else F.conv2d(x, wm, bm, stride, padding, dilation, groups)
    return y.contiguous(memory_format=output_format(x))


# oneDNN and cuDNN compute output channels in blocks of this many (fp32 AVX-512 / tensor-core tiles)
CHANNEL_BLOCK = 16

def _scatter_channels(z: Tensor, idx: Tensor, cout: int, fmt=torch.contiguous_format,
                      out_live: Live | None = None) -> Tensor:
    """[N, cout, H, W] in `fmt` with z's channels at `idx` (sorted) and exact zeros elsewhere.

    CPU: one zero fill of the whole output, then one ``index_copy_`` of the live channels. Why not
    write each byte once (copy the live runs, zero only the dead ones)? Measured after a real conv
    (`benches/micro/bench_scatter.py`), the fill runs at memset speed and one ``index_copy_`` beats a
    copy or fill per run of channels (each a separate parallel loop, tens of them on random masks):
    the conv plus this scatter took 1.03-1.09x the sliced conv on ResNet-50's 3x3 layers against
    1.03-1.16x by runs; ``index_copy_`` then ``index_fill_`` of the dead channels was slower still
    (1.04-1.99x the conv against 1.04-1.55x, 2026-12-08). Elsewhere (CUDA): the live channels copied
    in, only the dead ones zeroed, where the dead indices are known without a device read (`out_live`
    read from the mask); else the CPU's way (finding them would make the host wait for the device)."""
    n, _, oh, ow = z.shape
    y = torch.empty((n, cout, oh, ow), dtype=z.dtype, device=z.device, memory_format=fmt)
    dead = None if out_live is None or z.device.type == "cpu" else out_live.dead_idx
    if dead is None:
        return y.zero_().index_copy_(1, idx, z)
    y.index_copy_(1, idx, z)
    y.index_fill_(1, dead, 0)
    return y


def gather_channels(t: Tensor, idx: Tensor | None) -> Tensor:
    """t[:, idx] (idx sorted): one ``index_select`` (on the CPU as fast as slice copies per run of
    channels or faster: 0.49-1.01 of their time over 18 planes of 14x14 to 56x56, batch 8 and 64)."""
    return t if idx is None else t.index_select(1, idx)


def _scatter(full_shape, like: Tensor, idx: Tensor | None, part: Tensor, dim: int) -> Tensor:
    """`part` placed at `idx` along `dim` of a zero tensor of `full_shape` (no copy when idx is None)."""
    if idx is None:
        return part
    full = like.new_zeros(full_shape)
    full.index_copy_(dim, idx, part)
    return full


def _weight_grad(weight: Tensor, sel: Selection, part: Tensor) -> Tensor:
    """dL/dW: rows `out_idx` (and, for groups == 1, columns `in_idx`) from `part`, zero elsewhere."""
    if sel.gather_cols:
        part = _scatter((part.shape[0], weight.shape[1], *part.shape[2:]), part, sel.in_idx, part, 1)
    return _scatter(weight.shape, weight, sel.out_idx, part, 0)


def _mask_grad(ws: Tensor, dws: Tensor, bs: Tensor | None, gsum: Tensor) -> Tensor:
    """dL/dm = <W', dL/dW'> + b * sum(dL/dy), reduced in float32 (float64 stays float64)."""
    acc = torch.promote_types(ws.dtype, torch.float32)
    gm = (ws.to(acc) * dws.to(acc)).sum((1, 2, 3))
    if bs is not None:
        gm = gm + bs.to(acc) * gsum
    return gm


def _skipped_mask_grad(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, out_mask: Tensor,
                       in_active: Tensor | None, sel: Selection, stride, padding, dilation, groups: int):
    """Soft mode: dL/dm of the channels the forward skipped (one weight-gradient pass over them)."""
    cin, cout = x.shape[1], weight.shape[0]
    covered = torch.zeros(cout, dtype=torch.bool, device=x.device)
    covered[sel.out_idx] = True
    rest = select(~covered, in_active, groups, cin, cout)
    gr = gather_channels(grad, rest.out_idx)
    xr, wr, br, _ = _gathered(rest, x, weight, bias, out_mask)
    gsum = gr.to(torch.promote_types(grad.dtype, torch.float32)).sum((0, 2, 3))
    if xr.shape[1]:
        _, dwr, _ = torch.ops.aten.convolution_backward(
            gr, xr, wr, None, stride, padding, dilation, False, [0, 0], rest.groups, [False, True, False])
        return rest.out_idx, _mask_grad(wr, dwr, br, gsum)
    gmr = torch.zeros_like(gsum)
    return rest.out_idx, gmr if br is None else gmr + br.to(gmr.dtype) * gsum


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                   need_x: bool, need_w: bool, gemm: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dx, dL/dW) of conv2d(x, weight) without bias: oneDNN/cuDNN, or a GEMM (pointwise convs)."""
    if gemm:
        return gemm_conv.conv1x1_backward(grad, x, weight, need_x, need_w)
    gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                    [0, 0], groups, [need_x, need_w, False])
    return gx, gw


def backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, out_mask: Tensor,
             in_mask: Tensor | None, stride, padding, dilation, groups: int, hard: bool,
             needs: list[bool], *, gemm: bool = False, out_live: Live | None = None,
             in_live: Live | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (x, weight, bias, out_mask); an empty tensor where `needs` is False.

    `gemm` (pointwise convs, `gemm.valid`) computes the live channels' gradients as GEMMs.
    `out_live` / `in_live`: the masks' live sets when the caller read them already (the dispatcher
    runs this several times while it measures; the masks are read once)."""
    need_x, need_w, need_b, need_m = needs
    need_b = need_b and bias is not None
    cin, cout = x.shape[1], weight.shape[0]
    out_active = out_mask != 0
    in_active = _active(in_mask)
    if out_live is not None and (in_mask is None or in_live is not None):
        sel = select_live(out_live, in_live, groups, cin, cout)
    else:
        sel = select(out_active, in_active, groups, cin, cout)
    acc = torch.promote_types(grad.dtype, torch.float32)
    gx = gw = gb = gm = None
    if sel.n_out:
        gs = gather_channels(grad, sel.out_idx)
        xs, ws, bs, ms = _gathered(sel, x, weight, bias, out_mask)
        gsum = gs.to(acc).sum((0, 2, 3)) if need_b or (need_m and bs is not None) else None
        if (need_x or need_w or need_m) and xs.shape[1]:
            gxs, dws = _conv_backward(gs, xs, ws * ms.reshape(-1, 1, 1, 1), stride, padding, dilation,
                                      sel.groups, need_x, need_w or need_m, gemm)
            if need_x:
                # written once: the live input channels copied in, only the others zeroed
                gx = gxs.contiguous() if sel.in_idx is None else _scatter_channels(gxs.contiguous(), sel.in_idx, cin)
            if need_w:
                gws = dws * ms.reshape(-1, 1, 1, 1)
                if sel.col_flag is not None:
                    gws = gws * sel.col_flag[:, :, None, None].to(gws.dtype)
                gw = _weight_grad(weight, sel, gws)
            if need_m:
                gms = _mask_grad(ws, dws, bs, gsum).to(out_mask.dtype)
                gm = _scatter(out_mask.shape, out_mask, sel.out_idx, gms, 0)
        elif need_m and bs is not None:
            gm = _scatter(out_mask.shape, out_mask, sel.out_idx, (bs.to(acc) * gsum).to(out_mask.dtype), 0)
        if need_b:
            gb = _scatter(bias.shape, bias, sel.out_idx, (ms.to(acc) * gsum).to(bias.dtype), 0)
    if need_m and gm is None:
        gm = torch.zeros_like(out_mask)
    if need_m and hard:
        gm = torch.where(out_active, gm, torch.zeros_like(gm))
    elif need_m and sel.n_out < cout:
        idx, gmr = _skipped_mask_grad(grad, x, weight, bias, out_mask, in_active, sel, stride, padding, dilation,
                                      groups)
        gm = gm.index_copy(0, idx, gmr.to(gm.dtype)) if idx is not None else gmr.to(gm.dtype)
    gx = gx if gx is not None else torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x else None
    gw = gw if gw is not None else torch.zeros_like(weight) if need_w else None
    gb = gb if gb is not None else torch.zeros_like(bias) if need_b else None
    return tuple(t if t is not None else x.new_empty(0) for t in (gx, gw, gb, gm))
