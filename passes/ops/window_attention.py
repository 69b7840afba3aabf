"""Window attention of torchvision's Swin (v1, v2, video Swin3D) and MaxViT: whole heads, or every head narrower.

torchvision marks `shifted_window_attention` and `_get_relative_position_bias` with
`torch.fx.wrap`, so a `ShiftedWindowAttention` traces to a call of each (v2 traces its `cpb_mlp`,
the `view(-1, num_heads)` and `16 * sigmoid(...)` between them as ordinary ops). A head h owns the
q, k and v rows [h*d, (h+1)*d) of `qkv.weight` / `qkv.bias` (three blocks of C rows), the same
columns of `proj.weight`, column h of `relative_position_bias_table` (v1) or row h of the
`cpb_mlp`'s last Linear (v2: it computes the table), and `logit_scale[h]` (v2). Removing a head
removes its term from the sum the output projection computes, so the masked reference zeroes the
removed heads' `proj.weight` columns (role "in") and the slim model computes with fewer heads of
the same width d. The residual stream width C stays (as for nn.MultiheadAttention): the attention's
MACs are then the kept heads' fraction of the original (exact in the cost model).

`shifted_window_attention` derives the head width as C // num_heads from its input, which is wrong
once heads go: the rewrite calls `pruned_shifted_window_attention` instead (the same computation,
the head width passed explicitly). v2's zeroed k block of `qkv.bias` is kept (the function zeroes
the middle third of the sliced bias, which is the kept heads' k block).

Heads stay (with the reason in the report) where the bias or the logit scale is not per head or
is computed by code whose heads fxprune does not follow; a call whose q/k/v or output projection
weights are computed rather than parameters, or whose head count it cannot read, is a boundary.

MaxViT's `RelativePositionalMultiHeadAttention` reshapes the heads' output to the input width
(`reshape(B, G, P, D)` with D read from `x.shape`), so it is traced as a leaf (registered here)
and handled like nn.MultiheadAttention: a head owns its q, k, v rows of `to_qkv`, its `merge`
columns and its column of `relative_position_bias_table`; the rewrite puts a
`PrunedRelativePositionalMultiHeadAttention` (same tensors, plain ops) in its place. Its MACs all
scale with the kept heads: the node names `to_qkv.weight` for the cost model (`WEIGHT_SOURCE`).

With ``heads="width"`` (or ``"auto"``; the analysis' `heads` option, as for nn.MultiheadAttention,
`attention.py`) every head stays and is narrowed instead: position j of the q and k blocks of every
head is one unit, position j of the v block another, with the projection columns it feeds (all role
"in": the masked reference zeroes the removed rows). The per-head bias table, v2's cpb_mlp and logit
scale stay whole (their heads are marked). The slim Swin call passes `head_dim` (q/k), `v_dim` and
the original `scale` = 1/sqrt(head_dim) (v1's scores; v2's cosine attention normalises q and k over
their kept positions, which is what the zeroed positions give); MaxViT's pruned module splits
`to_qkv` into blocks of n_heads x (qk_dim, qk_dim, v_dim). The node lists its q/k and v MACs parts
for the cost model (`attention_terms`; the tokens of a window from `window_size`, a MaxViT
partition from the input), so the count is exact.

`PatchMergingPad` follows the stream through Swin's patch merging (four neighbours concatenated on
the channel dim). MViT's attention: `mvit_attention.py`. The video Swin3D's
(`torchvision.models.video.swin_transformer`: `shifted_window_attention_3d` and its own
`_get_relative_position_bias`, both wrapped) is handled the same way (`ShiftedWindowAttention3dFunction`,
`pruned_shifted_window_attention_3d`); its window size is a traced value (`_get_window_and_shift_size`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import Layout
from ..tracer import register_leaf_module
from ..cost import MACS_TERMS
from .attention import attention_terms, head_members, heads_mode, kept_heads
from .conv import WEIGHT_SOURCE
from .registry import OpHandler, get_arg, get_attr_target, register_function, register_module, set_arg

_STREAM = "the residual stream of Swin's window attention stays (its heads are pruned)"



def pruned_shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Optional[Tensor] = None,
    proj_bias: Optional[Tensor] = None,
    logit_scale: Optional[Tensor] = None,
    training: bool = True,
    head_dim: Optional[int] = None,
    v_dim: Optional[int] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """torchvision's `shifted_window_attention` with `num_heads` heads of `head_dim` q/k positions
    and `v_dim` v positions (default `head_dim`) on a C-wide stream (num_heads x the widths may be
    less than C), the scores scaled by `scale` (default head_dim ** -0.5; a head pruned to fewer
    q/k positions keeps its original scale). Same arguments, plus those three."""
    B, H, W, C = input.shape
    d = C // num_heads if head_dim is None else head_dim
    dv = d if v_dim is None else v_dim
    inner = num_heads * dv
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape

    shift_size = list(shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))

    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[num_heads * d: 2 * num_heads * d].zero_()  # the k block
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = (part.reshape(x.size(0), x.size(1), num_heads, width).transpose(1, 2) for part, width in
               zip(qkv.split([num_heads * d, num_heads * d, inner], dim=-1), (d, d, dv)))
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (d ** -0.5 if scale is None else scale)).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]: h[1], w[0]: w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


torch.fx.wrap("pruned_shifted_window_attention")


def pruned_shifted_window_attention_3d(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Optional[Tensor] = None,
    proj_bias: Optional[Tensor] = None,
    training: bool = True,
    head_dim: Optional[int] = None,
    v_dim: Optional[int] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """torchvision's video `shifted_window_attention_3d` (Swin3D) with `num_heads` heads of
    `head_dim` q/k positions and `v_dim` v positions on a C-wide stream, the scores scaled by
    `scale` (defaults as `pruned_shifted_window_attention`). Same arguments, plus those three."""
    b, t, h, w, c = input.shape
    d = c // num_heads if head_dim is None else head_dim
    dv = d if v_dim is None else v_dim
    inner = num_heads * dv
    pad_size = _swin3d._compute_pad_size_3d((t, h, w), (window_size[0], window_size[1], window_size[2]))
    x = F.pad(input, (0, 0, 0, pad_size[2], 0, pad_size[1], 0, pad_size[0]))
    _, tp, hp, wp, _ = x.shape
    padded_size = (tp, hp, wp)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
    num_windows = math.prod(padded_size[i] // window_size[i] for i in range(3))
    x = x.view(b, padded_size[0] // window_size[0], window_size[0], padded_size[1] // window_size[1], window_size[1],
               padded_size[2] // window_size[2], window_size[2], c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * num_windows, window_size[0] * window_size[1] * window_size[2], c)

    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = (part.reshape(x.size(0), x.size(1), num_heads, width).transpose(1, 2) for part, width in
               zip(qkv.split([num_heads * d, num_heads * d, inner], dim=-1), (d, d, dv)))
    attn = (q * (d ** -0.5 if scale is None else scale)).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = _swin3d._compute_attention_mask_3d(x, padded_size, (window_size[0], window_size[1], window_size[2]),
                                               (shift_size[0], shift_size[1], shift_size[2]))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(b, padded_size[0] // window_size[0], padded_size[1] // window_size[1], padded_size[2] // window_size[2],
               window_size[0], window_size[1], window_size[2], c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1], shift_size[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


torch.fx.wrap("pruned_shifted_window_attention_3d")


def window_and_shift_size(shift_size: list[int], size_dhw: list[int], window_size: list[int]):
    """Swin3D's `_get_window_and_shift_size` on copies of its lists: torchvision's edits them in
    place (its module passes fresh `.copy()`s), and in a traced graph they are the node's constant
    arguments, immutable under `torch.export`'s interpreter (and shared by every call)."""
    return _swin3d._get_window_and_shift_size(list(shift_size), list(size_dhw), list(window_size))


torch.fx.wrap("window_and_shift_size")


def _heads_axis(ctx, arg, num_heads: int, heads: np.ndarray, node: fx.Node, what: str) -> str | None:
    """Tie the heads axis (dim -3) of a per-head tensor `arg` (bias (1, nH, N, N), logit scale
    (nH, 1, 1)) to `heads`; a reason why the heads must stay, or None."""
    spec = ctx.spec(arg)
    if spec is None or not hasattr(spec, "shape"):
        return f"its {what} is not a tensor fxprune follows"
    shape, lay = tuple(spec.shape), ctx.layout(arg)
    dim = len(shape) - 3
    if len(shape) < 3 or shape[-3] != num_heads or (isinstance(lay, Layout) and lay.dim != dim):
        ctx.mark_all(lay, f"{node.name} reads {arg.name} whole")  # its own channels, if any, stay
        if (len(shape) < 3 and math.prod(shape) == 1) or (len(shape) >= 3 and shape[-3] == 1):
            return None  # the same for every head
        return f"its {what} (shape {shape}) is not per head"
    target = get_attr_target(arg)
    if target is not None:
        ctx.member(target, dim, heads, "channel", node)
        return None
    if isinstance(lay, Layout):
        ctx.couple(heads, lay.ids)
        return None
    return f"its {what} is computed where fxprune does not follow the heads"


# positional index of each argument of `shifted_window_attention` (and of the pruned function);
# Swin3D's has no logit_scale, so its training flag and the pruned extras come one earlier
_POSITIONS_2D = dict(input=0, qkv_weight=1, proj_weight=2, relative_position_bias=3, window_size=4, num_heads=5,
                     qkv_bias=9, proj_bias=10, logit_scale=11, head_dim=13, v_dim=14, scale=15)
_POSITIONS_3D = {**_POSITIONS_2D, "logit_scale": None, "head_dim": 12, "v_dim": 13, "scale": 14}


def _swin_parts(node: fx.Node, positions: dict = _POSITIONS_2D):
    p = {name: (None if i is None else get_arg(node, i, name)) for name, i in positions.items()}
    p["x"], p["bias"] = p.pop("input"), p.pop("relative_position_bias")
    return p


def _widths(p: dict, c: int) -> tuple[int, int] | None:
    """(q/k width, v width) of a head: passed (a pruned call) or C // num_heads (torchvision's)."""
    n, d, dv = p["num_heads"], p["head_dim"], p["v_dim"]
    if not isinstance(n, int) or n < 1 or not all(w is None or isinstance(w, int) for w in (d, dv)):
        return None
    if d is None:
        if c % n:
            return None
        d = c // n
    return d, d if dv is None else dv


def _window_tokens(window_size) -> int | None:
    """The tokens of one window (the queries and keys of each attention), or None if not constants."""
    if isinstance(window_size, (list, tuple)) and window_size and all(isinstance(w, int) for w in window_size):
        return math.prod(window_size)
    return None


class ShiftedWindowAttentionFunction(OpHandler):
    """`shifted_window_attention(x, qkv.weight, proj.weight, bias, window, num_heads, ...)`: whole
    heads, or every head narrowed (``heads="width"``, as nn.MultiheadAttention; the per-head bias and
    logit scale then stay whole)."""

    positions = _POSITIONS_2D
    pruned = staticmethod(pruned_shifted_window_attention)

    def analyze(self, ctx, node):
        p = _swin_parts(node, self.positions)
        weights = {k: get_attr_target(p[k]) for k in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")}
        if any(weights[k] is None and p[k] is not None for k in weights):
            ctx.boundary(node, "window attention whose qkv/proj weights or biases are computed, not parameters")
            return None
        x, num_heads = p["x"], p["num_heads"]
        shape = tuple(ctx.spec(x).shape)
        c = shape[-1]
        widths = _widths(p, c)
        if widths is None or tuple(ctx.spec(p["qkv_weight"]).shape) != (num_heads * (2 * widths[0] + widths[1]), c) \
                or ctx.spec(p["proj_weight"]).shape[1] != num_heads * widths[1]:
            ctx.boundary(node, "window attention whose number of heads or weight shapes fxprune cannot read")
            return None
        node.meta.pop(MACS_TERMS, None)  # an earlier analysis of this graph may have set it
        tokens = _window_tokens(ctx.spec(p["window_size"]))
        mode = heads_mode(ctx, num_heads, widths[0]) if tokens is not None else "whole"
        dim = len(shape) - 1
        in_ids = ctx.ids_on(x, dim, node)
        ctx.mark(in_ids, _STREAM)
        proj_out = ctx.spec(p["proj_weight"]).shape[0]
        heads = head_members(ctx, node, in_ids, weights["qkv_weight"], weights["qkv_bias"], weights["proj_weight"],
                             proj_out, num_heads, *widths, mode)
        ctx.mark(heads.out_ids, _STREAM)
        if weights["proj_bias"] is not None:
            ctx.member(weights["proj_bias"], 0, heads.out_ids, "channel", node)
        per_head = heads.units if mode == "whole" else ctx.new_ids(num_heads)
        why = _heads_axis(ctx, p["bias"], num_heads, per_head, node, "relative position bias")
        if why is None and p["logit_scale"] is not None:
            why = _heads_axis(ctx, p["logit_scale"], num_heads, per_head, node, "logit scale")
        if mode == "width":
            node.meta[MACS_TERMS] = attention_terms(tokens, tokens, c, proj_out, heads)
            ctx.mark(per_head, f"{node.name}: every head stays, narrower (heads='width')")
        elif why is not None:
            ctx.mark(heads.units, f"{node.name}: heads stay: {why}")
        return Layout(dim, heads.out_ids)

    def rewrite(self, rctx, node):
        p = _swin_parts(node, self.positions)
        key = (get_attr_target(p["qkv_weight"]), 0)
        if key not in rctx.channels.members:
            return  # a boundary
        d, dv = _widths(p, rctx.spec(p["x"]).shape[-1])
        kept = kept_heads(rctx.kept(rctx.channels.members[key].ids), p["num_heads"], d, dv)
        if kept == (p["num_heads"], d, dv):
            return
        node.target = self.pruned
        set_arg(node, 5, "num_heads", kept[0])
        scale = d ** -0.5 if p["scale"] is None else p["scale"]  # the original head width's
        node.kwargs = {**node.kwargs, "head_dim": kept[1], "v_dim": kept[2], "scale": scale}


class ShiftedWindowAttention3dFunction(ShiftedWindowAttentionFunction):
    """Swin3D's `shifted_window_attention_3d` (torchvision.models.video): the same heads and widths
    on (B, T, H, W, C) windows; its window size comes out of `_get_window_and_shift_size` (the
    traced value gives the window's tokens for the cost model)."""

    positions = _POSITIONS_3D
    pruned = staticmethod(pruned_shifted_window_attention_3d)


class WindowAndShiftSize(OpHandler):
    """Swin3D's `_get_window_and_shift_size` (lists in, lists out: no channels). The rewrite calls
    `window_and_shift_size` instead, which leaves the graph's constant lists alone, so that the slim
    model exports (`torch.export`, ONNX)."""

    def analyze(self, ctx, node):
        return None

    def rewrite(self, rctx, node):
        node.target = window_and_shift_size


class RelativePositionBiasFunction(OpHandler):
    """`_get_relative_position_bias(table, index, window)`: table (M, nH) -> (1, nH, N, N). The
    table's columns are heads: a parameter's columns are registered, a computed table's (v2's
    `cpb_mlp(...).view(-1, nH)`) are followed."""

    def analyze(self, ctx, node):
        table = get_arg(node, 0, "relative_position_bias_table")
        spec = ctx.spec(table)
        if spec is None or len(spec.shape) != 2:
            ctx.boundary(node, "relative position bias table that is not a 2-D tensor")
            return None
        target = get_attr_target(table)
        if target is not None:
            ids = ctx.member(target, 1, None, "channel", node, size=spec.shape[1])
        else:
            ids = ctx.ids_on(table, 1, node)
        return Layout(1, ids)


class PrunedRelativePositionalMultiHeadAttention(nn.Module):
    """torchvision's MaxViT `RelativePositionalMultiHeadAttention` with `n_heads` heads of `qk_dim`
    q/k positions and `v_dim` v positions (default: the original head_dim) on a `feat_dim` stream
    (n_heads x the widths may be less than feat_dim): the same tensors and scale (feat_dim ** -0.5,
    as torchvision computes it), the output reshaped to the kept heads' width before `merge`."""

    def __init__(self, attn: nn.Module, n_heads: int, qk_dim: int | None = None, v_dim: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, attn.head_dim
        self.qk_dim = getattr(attn, "qk_dim", attn.head_dim) if qk_dim is None else qk_dim
        self.v_dim = getattr(attn, "v_dim", attn.head_dim) if v_dim is None else v_dim
        self.size, self.max_seq_len, self.scale_factor = attn.size, attn.max_seq_len, attn.scale_factor
        self.to_qkv, self.merge = attn.to_qkv, attn.merge
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index)
        self.to_qkv.out_features = n_heads * (2 * self.qk_dim + self.v_dim)
        self.merge.in_features = n_heads * self.v_dim

    def get_relative_positional_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.max_seq_len, self.max_seq_len, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        B, G, P, _ = x.shape
        H, DQ, DV = self.n_heads, self.qk_dim, self.v_dim
        q, k, v = self.to_qkv(x).split([H * DQ, H * DQ, H * DV], dim=-1)
        q = q.reshape(B, G, P, H, DQ).permute(0, 1, 3, 2, 4)
        k = k.reshape(B, G, P, H, DQ).permute(0, 1, 3, 2, 4) * self.scale_factor
        v = v.reshape(B, G, P, H, DV).permute(0, 1, 3, 2, 4)
        attn = F.softmax(torch.einsum("bghid,bghjd->bghij", q, k) + self.get_relative_positional_bias(), dim=-1)
        out = torch.einsum("bghij,bghjd->bghid", attn, v).permute(0, 1, 3, 2, 4).reshape(B, G, P, H * DV)
        return self.merge(out)


class RelativePositionalAttentionModule(OpHandler):
    """MaxViT's `RelativePositionalMultiHeadAttention` (a leaf of the trace: its code reshapes the
    heads' output to the input width, which the rewrite must change): a head owns its q, k, v rows
    of `to_qkv`, its `merge` columns and its column of `relative_position_bias_table`; with
    ``heads="width"`` every head stays, narrower, and the table stays whole."""

    def analyze(self, ctx, node):
        attn, t = ctx.get_submodule(node.target), node.target
        x = node.args[0]
        shape = tuple(ctx.spec(x).shape)
        dim = len(shape) - 1
        qk_dim, v_dim = getattr(attn, "qk_dim", attn.head_dim), getattr(attn, "v_dim", attn.head_dim)
        node.meta.pop(MACS_TERMS, None)  # an earlier analysis of this graph may have set it
        mode = heads_mode(ctx, attn.n_heads, qk_dim)
        in_ids = ctx.ids_on(x, dim, node)
        ctx.mark(in_ids, _STREAM_MAXVIT)
        heads = head_members(ctx, node, in_ids, f"{t}.to_qkv.weight", f"{t}.to_qkv.bias" if attn.to_qkv.bias
                             is not None else None, f"{t}.merge.weight", attn.merge.out_features, attn.n_heads,
                             qk_dim, v_dim, mode)
        ctx.mark(heads.out_ids, _STREAM_MAXVIT)
        if attn.merge.bias is not None:
            ctx.member(f"{t}.merge.bias", 0, heads.out_ids, "channel", node)
        if mode == "width":
            table = ctx.member(f"{t}.relative_position_bias_table", 1, None, "channel", node, size=attn.n_heads)
            ctx.mark(table, f"{node.name}: every head stays, narrower (heads='width')")
            node.meta[MACS_TERMS] = attention_terms(shape[-2], shape[-2], shape[-1], attn.merge.out_features, heads)
        else:
            ctx.member(f"{t}.relative_position_bias_table", 1, heads.units, "channel", node)
        node.meta[WEIGHT_SOURCE] = f"{t}.to_qkv.weight"  # its MACs scale with the kept heads
        return Layout(dim, heads.out_ids)

    def rewrite(self, rctx, node):
        attn = rctx.get_submodule(node.target)
        qk_dim, v_dim = getattr(attn, "qk_dim", attn.head_dim), getattr(attn, "v_dim", attn.head_dim)
        kept = kept_heads(rctx.kept(rctx.channels.members[(f"{node.target}.to_qkv.weight", 0)].ids), attn.n_heads,
                          qk_dim, v_dim)
        if kept == (attn.n_heads, qk_dim, v_dim):
            return
        parent, _, name = node.target.rpartition(".")
        setattr(rctx.get_submodule(parent) if parent else rctx.gm, name,
                PrunedRelativePositionalMultiHeadAttention(attn, *kept))
        rctx.forget_module(node.target)


_STREAM_MAXVIT = "the residual stream of MaxViT's attention stays (its heads are pruned)"


class PatchMergingPad(OpHandler):
    """Swin's `_patch_merging_pad` (wrapped, so a call in the graph): pads H and W to even and
    concatenates the four 2x2 neighbours on the last dim, so input channel c is output channels c,
    C+c, 2C+c and 3C+c. It reads C from its input: the slim model needs no rewrite. With the stream
    pruned (layernorm="prune") the kept channels flow on into the merge's norm and reduction."""

    def analyze(self, ctx, node):
        x = get_arg(node, 0, "x")
        lay = ctx.layout(x)
        if not isinstance(lay, Layout):
            return None
        if lay.dim != ctx.spec(x).ndim - 1:
            ctx.boundary(node, "Swin patch merging of a tensor whose channels are not on the last dim")
            return None
        return Layout(lay.dim, np.tile(lay.ids, 4))


try:  # torchvision is optional
    from torchvision.models import maxvit as _maxvit
    from torchvision.models import swin_transformer as _swin
    from torchvision.models.video import swin_transformer as _swin3d
except ImportError:  # pragma: no cover
    _swin = _maxvit = _swin3d = None
if _swin is not None:
    register_function(_swin.shifted_window_attention)(ShiftedWindowAttentionFunction)
    register_function(_swin._get_relative_position_bias)(RelativePositionBiasFunction)
    register_function(_swin._patch_merging_pad)(PatchMergingPad)
if _swin3d is not None:
    register_function(_swin3d.shifted_window_attention_3d)(ShiftedWindowAttention3dFunction)
    register_function(_swin3d._get_relative_position_bias)(RelativePositionBiasFunction)
    register_function(_swin3d._get_window_and_shift_size, window_and_shift_size)(WindowAndShiftSize)
if _maxvit is not None:
    for _cls in (_maxvit.RelativePositionalMultiHeadAttention, PrunedRelativePositionalMultiHeadAttention):
        register_leaf_module(_cls, "MaxViT attention: its heads are pruned whole (passes/ops/window_attention.py)")
        register_module(_cls)(RelativePositionalAttentionModule)
register_function(pruned_shifted_window_attention)(ShiftedWindowAttentionFunction)
register_function(pruned_shifted_window_attention_3d)(ShiftedWindowAttention3dFunction)

__all__ = ["PrunedRelativePositionalMultiHeadAttention", "pruned_shifted_window_attention",
           "pruned_shifted_window_attention_3d", "window_and_shift_size"]
