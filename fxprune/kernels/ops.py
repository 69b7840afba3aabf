"""Registration of ``torch.ops.fxprune.masked_conv2d`` and its backward with `torch.library`.

Why `custom_op` and not `triton_op`: a `triton_op` is decomposed into its Python body under
`torch.compile` on every device, and the gather path has data-dependent shapes that would make
the compiled graph depend on the mask's values. A `custom_op` is opaque to compile and export (they
see one node with a fake implementation) and its body runs eagerly.

Registered here: the op, whose body (every device) dispatches among the implementations by
measurement (`dispatch`: gather path in the input's layout or channels_last, dense conv with the
mask folded in, the Triton kernel on CUDA when triton is importable); fake implementations of both
ops (shapes and memory format only, so `torch.compile` / `torch.export` work); `register_autograd`
(the backward is a second opaque op, `fxprune::masked_conv2d_backward`, `gather.backward` on every
device); and FLOP formulas for both so `FlopCounterMode` counts only the live channels.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..errors import InputError
from . import dispatch, gather, gemm
from .live import live

try:  # triton is optional: the CPU-only torch wheel may come without it
    from . import triton_conv
except ImportError:  # pragma: no cover - depends on the install
    triton_conv = None

_CUDA_NAMES = {"auto": "auto", "torch": "gather", "triton": "triton"}


@contextlib.contextmanager
def cuda_backend(name: str):
    """Force ``"triton"`` or ``"torch"`` (the gather path) inside the block; `dispatch.backend` names more."""
    if name not in _CUDA_NAMES:
        raise InputError(f"unknown masked-conv backend {name!r}: choose from {', '.join(_CUDA_NAMES)}")
    if name == "triton" and triton_conv is None:
        raise InputError("the triton backend needs the triton package: pip install triton")
    with dispatch.backend(_CUDA_NAMES[name]):
        yield


def _triton_valid(x: Tensor, interpreted_ok: bool) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (only when forced: it is slow)."""
    if triton_conv is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return x.device.type == "cuda" or (interpreted_ok and x.device.type == "cpu" and triton_conv._interpreted())


def _forward(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask, out_idx=None, in_idx=None):
    """Dispatch the forward among the valid implementations (see `dispatch`). `out_idx` / `in_idx`:
    the masks' live indices when the caller remembers them (then the masks are not read)."""
    out_live = live(out_mask, out_idx)
    in_live = None if in_mask is None else live(in_mask, in_idx)
    conf = (stride, padding, dilation, groups)
    runners = {
        "gather": lambda: gather.forward(x, weight, bias, out_mask, in_mask, *conf, out_live=out_live, in_live=in_live),
        "dense": lambda: gather.dense_forward(x, weight, bias, out_mask, in_mask, *conf),
    }
    if gather.output_format(x) == torch.contiguous_format and x.shape[1] > 1:
        runners["gather_cl"] = lambda: gather.forward(x, weight, bias, out_mask, in_mask, *conf, channels_last=True,
                                                      out_live=out_live, in_live=in_live)
    if groups == 1 and gather.output_format(x) == torch.contiguous_format:
        runners["gather_zero_row"] = lambda: gather.forward(x, weight, bias, out_mask, in_mask, *conf, zero_row=True,
                                                            out_live=out_live, in_live=in_live)
    if gemm.valid(x, weight, stride, padding, groups):
        runners["gemm"] = lambda: gather.forward(x, weight, bias, out_mask, in_mask, *conf, gemm=True,
                                                 out_live=out_live, in_live=in_live)
        runners["dense_gemm"] = lambda: gather.dense_forward(x, weight, bias, out_mask, in_mask, *conf, gemm=True)
    if _triton_valid(x, interpreted_ok=dispatch.forced() == "triton"):
        def run_triton():
            with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
                return triton_conv.masked_conv2d(x, weight, bias, out_mask, in_mask, *conf)
        runners["triton"] = run_triton
    training = any(t is not None and t.requires_grad for t in (x, weight, bias, out_mask))
    key = dispatch.call_class(x, weight, stride, padding, dilation, groups,
                              None if in_live is None else in_live.density, out_live.density, training)
    return dispatch.run(key, runners, x.device, out_live.density)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor, in_mask: Optional[Tensor],
           stride, padding, dilation, groups: int, out_live: Optional[Tensor] = None,
           in_live: Optional[Tensor] = None) -> None:
    """Refuse arguments the kernels cannot use, naming the argument and the fix."""
    if x.dim() != 4 or weight.dim() != 4:
        raise InputError(f"masked_conv2d takes a 4-D input [N, C, H, W] and 4-D weight; got {x.dim()}-D input "
                         f"and {weight.dim()}-D weight")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise InputError("masked_conv2d: stride, padding and dilation must each be two ints (h, w)")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or groups < 1:
        raise InputError(f"masked_conv2d: stride {list(stride)} and dilation {list(dilation)} must be >= 1, "
                         f"padding {list(padding)} >= 0, groups {groups} >= 1")
    cout = weight.shape[0]
    if cout % groups or x.shape[1] != weight.shape[1] * groups:
        raise InputError(f"masked_conv2d: input has {x.shape[1]} channels and weight is {list(weight.shape)} with "
                         f"groups={groups}; need in_channels == weight.shape[1] * groups and "
                         "out_channels divisible by groups")
    for name, t, n in (("out_mask", out_mask, cout), ("bias", bias, cout), ("in_mask", in_mask, x.shape[1])):
        if t is not None and tuple(t.shape) != (n,):
            raise InputError(f"masked_conv2d: {name} must have shape [{n}] (one value per channel); got "
                             f"{list(t.shape)}. Reshape a [1, C, 1, 1] scale with .reshape(-1)")
    for name, t in (("weight", weight), ("bias", bias), ("out_mask", out_mask), ("in_mask", in_mask)):
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise InputError(f"masked_conv2d: {name} is {t.dtype} on {t.device} but the input is {x.dtype} on "
                             f"{x.device}; cast it with .to(x)")
    if not x.dtype.is_floating_point:
        raise InputError(f"masked_conv2d needs floating-point tensors, got {x.dtype}")
    for name, idx, mask in (("out_live", out_live, out_mask), ("in_live", in_live, in_mask)):
        if idx is None:
            continue
        if mask is None:
            raise InputError(f"masked_conv2d: {name} (the live indices of a mask) was given without the mask; "
                             "pass the mask too, or leave the indices out")
        if idx.dim() != 1 or idx.dtype != torch.long or idx.device != x.device or idx.numel() > mask.numel():
            raise InputError(f"masked_conv2d: {name} must be the sorted indices of the mask's non-zero entries: "
                             f"a 1-D int64 tensor on {x.device} with at most {mask.numel()} entries; got "
                             f"{idx.dim()}-D {idx.dtype} on {idx.device} with {idx.numel()}. Leave it out to "
                             "have the op read the mask")
    oh, ow = gather.conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3],
                                     stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise InputError(f"masked_conv2d: input {list(x.shape[2:])} is smaller than the dilated kernel; "
                         "the output would be empty. Use a larger input or more padding")


@torch.library.custom_op("fxprune::masked_conv2d", mutates_args=())
def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, in_mask: Optional[Tensor] = None,
                  hard: bool = True, out_live: Optional[Tensor] = None,
                  in_live: Optional[Tensor] = None) -> Tensor:
    """y = (conv2d(x * [in_mask != 0], weight) + bias) * out_mask; zero-mask channels are skipped.

    `out_live` / `in_live` (optional): the sorted indices of the masks' non-zero entries, trusted
    as given (the fused pass hands over the live sets it remembers per mask version); with them
    the op never reads a mask's values, so it never makes the host wait for the device."""
    _check(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, out_live, in_live)
    y = _forward(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask, out_live, in_live)
    # never a view: autograd forbids an in-place op (ReLU(inplace=True)) on a custom function's view output
    return y if y._base is None else y.clone()


@masked_conv2d.register_fake
def _masked_conv2d_fake(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask=None, hard=True,
                        out_live=None, in_live=None):
    _check(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, out_live, in_live)
    oh, ow = gather.conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3],
                                     stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=gather.output_format(x))


@torch.library.custom_op("fxprune::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], out_mask: Tensor,
                           in_mask: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                           groups: int, hard: bool, needs: list[bool], out_live: Optional[Tensor] = None,
                           in_live: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (x, weight, bias, out_mask); an empty tensor for each one `needs` says is not needed.

    Dispatched by measurement like the forward (its own call class): oneDNN/cuDNN's convolution
    backward over the live channels (`conv`), or GEMMs for pointwise convs (`gemm`). `out_live` /
    `in_live`: the forward's remembered live indices, if it had them."""
    grad = grad.contiguous()
    out_idx, in_idx = out_live, in_live
    out_live = live(out_mask, out_idx)  # read once per call (not at all when the indices came along)
    in_live = None if in_mask is None else live(in_mask, in_idx)
    conf = (stride, padding, dilation, groups, hard, needs)
    lives = dict(out_live=out_live, in_live=in_live)
    runners = {"conv": lambda: gather.backward(grad, x, weight, bias, out_mask, in_mask, *conf, **lives)}
    if gemm.valid(x, weight, stride, padding, groups):
        runners["gemm"] = lambda: gather.backward(grad, x, weight, bias, out_mask, in_mask, *conf, gemm=True,
                                                  **lives)
    density = out_live.density
    key = dispatch.call_class(x, weight, stride, padding, dilation, groups,
                              None if in_live is None else in_live.density, density, True)
    key += f"|backward|needs={''.join('1' if n else '0' for n in needs)}|{'hard' if hard else 'soft'}"
    return dispatch.run(key, runners, x.device, density, slot="last_backward")


@masked_conv2d_backward.register_fake
def _masked_conv2d_backward_fake(grad, x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups,
                                 hard, needs, out_live=None, in_live=None):
    shapes = (x, weight, bias, out_mask)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None
                 else x.new_empty(0) for t, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask, hard, out_live, in_live = inputs
    ctx.save_for_backward(x, weight, bias, out_mask, in_mask, out_live, in_live)
    ctx.conf = (list(stride), list(padding), list(dilation), groups, hard)


def _backward(ctx, grad):
    x, weight, bias, out_mask, in_mask, out_live, in_live = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    # stride, padding, dilation, groups, in_mask (a selection, not differentiated), hard, out_live, in_live
    none = (None,) * 8
    if not any(needs):
        return (None,) * 4 + none
    stride, padding, dilation, groups, hard = ctx.conf
    grads = torch.ops.fxprune.masked_conv2d_backward(grad, x, weight, bias, out_mask, in_mask, stride, padding,
                                                     dilation, groups, hard, needs, out_live, in_live)
    return tuple(g if need else None for g, need in zip(grads, needs)) + none


masked_conv2d.register_autograd(_backward, setup_context=_setup_context)


def _values(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor's values as a CPU bool 'live' vector, or None when they cannot be read (meta/fake)."""
    if t is None or t.device.type == "meta":
        return None
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t):
        return None
    return (t != 0).cpu()


def live_macs(x_shape, w_shape, out_shape, out_mask: Optional[Tensor], in_mask: Optional[Tensor], groups: int,
              channels: Optional[Tensor] = None) -> int:
    """Multiply-accumulates of the live channels: out pixels x taps x sum over groups of out x in live.

    `channels` (bool [C_out]) overrides the live output channels (the soft-mode backward counts the
    skipped ones). Masks whose values cannot be read (meta/fake tensors) count every channel.
    """
    cout, ipg, kh, kw = (int(s) for s in w_shape)
    per_pixel = int(out_shape[0]) * int(out_shape[2]) * int(out_shape[3]) * kh * kw
    out_live = channels if channels is not None else _values(out_mask)
    in_live = _values(in_mask)
    out_cnt = (torch.full((groups,), cout // groups) if out_live is None
               else out_live.reshape(groups, -1).sum(1))
    in_cnt = torch.full((groups,), ipg) if in_live is None else in_live.reshape(groups, -1).sum(1)
    return per_pixel * int((out_cnt * in_cnt).sum())


@register_flop_formula(torch.ops.fxprune.masked_conv2d, get_raw=True)
def _masked_conv2d_flop(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask=None, hard=True,
                        *args, out_val=None, **kwargs) -> int:
    return 2 * live_macs(x.shape, weight.shape, out_val.shape, out_mask, in_mask, groups)


@register_flop_formula(torch.ops.fxprune.masked_conv2d_backward, get_raw=True)
def _masked_conv2d_backward_flop(grad, x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups,
                                 hard, needs, *args, out_val=None, **kwargs) -> int:
    need_x, need_w, _, need_m = needs
    live = live_macs(x.shape, weight.shape, grad.shape, out_mask, in_mask, groups)
    macs = live * (int(need_x) + int(need_w or need_m))
    out_live = _values(out_mask)
    if need_m and not hard and out_live is not None and not bool(out_live.all()):
        skipped = ~out_live  # soft mode: a weight-gradient pass over the skipped channels
        macs += live_macs(x.shape, weight.shape, grad.shape, None, in_mask, groups, channels=skipped)
    return 2 * macs
