"""Window attention of torchvision's Swin (v1 and v2) and MaxViT: whole heads are pruned.

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

`PatchMergingPad` follows the stream through Swin's patch merging (four neighbours concatenated on
the channel dim). MViT's attention: `mvit_attention.py`. The video Swin3D's (`torchvision.models.video.swin_transformer`,
its own functions) is not handled: it stays a boundary.
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
from .conv import WEIGHT_SOURCE
from .registry import OpHandler, get_arg, get_attr_target, register_function, register_module, set_arg

_STREAM = "the residual stream of Swin's window attention stays (its heads are pruned)"



def head_members(ctx, node, in_ids, qkv: str, qkv_bias: bool, proj: str, proj_out: int, n_heads: int, head_dim: int):
    """The members of an attention block with one fused q/k/v Linear and an output projection:
    a head owns its rows of each q, k and v block (and bias) and the same columns of the
    projection. Returns (head ids, the projection's output ids)."""
    heads = ctx.new_ids(n_heads)
    per_row = np.repeat(heads, head_dim)
    ctx.member(f"{qkv}.weight", 1, in_ids, "in", node)
    ctx.member(f"{qkv}.weight", 0, np.tile(per_row, 3), "out", node)
    if qkv_bias:
        ctx.member(f"{qkv}.bias", 0, np.tile(per_row, 3), "channel", node)
    ctx.member(f"{proj}.weight", 1, per_row, "in", node)
    return heads, ctx.member(f"{proj}.weight", 0, None, "out", node, size=proj_out)

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
) -> Tensor:
    """torchvision's `shifted_window_attention` with `num_heads` heads of `head_dim` on a C-wide
    stream (num_heads * head_dim may be less than C). Same arguments, plus `head_dim`."""
    B, H, W, C = input.shape
    d = C // num_heads if head_dim is None else head_dim
    inner = num_heads * d
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
        length = qkv_bias.numel() // 3
        qkv_bias[length: 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * d ** -0.5).matmul(k.transpose(-2, -1))
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


def _swin_parts(node: fx.Node):
    return dict(
        x=get_arg(node, 0, "input"), qkv_weight=get_arg(node, 1, "qkv_weight"),
        proj_weight=get_arg(node, 2, "proj_weight"), bias=get_arg(node, 3, "relative_position_bias"),
        num_heads=get_arg(node, 5, "num_heads"), qkv_bias=get_arg(node, 9, "qkv_bias"),
        proj_bias=get_arg(node, 10, "proj_bias"), logit_scale=get_arg(node, 11, "logit_scale"),
        head_dim=get_arg(node, 13, "head_dim"))


def _head_dim(p: dict, c: int) -> int | None:
    """The head width: passed (a pruned call) or C // num_heads (torchvision's)."""
    n, d = p["num_heads"], p["head_dim"]
    if not isinstance(n, int) or n < 1 or not (d is None or isinstance(d, int)):
        return None
    if d is None:
        return c // n if c % n == 0 else None
    return d


class ShiftedWindowAttentionFunction(OpHandler):
    """`shifted_window_attention(x, qkv.weight, proj.weight, bias, window, num_heads, ...)`."""

    def analyze(self, ctx, node):
        p = _swin_parts(node)
        weights = {k: get_attr_target(p[k]) for k in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")}
        if any(weights[k] is None and p[k] is not None for k in weights):
            ctx.boundary(node, "window attention whose qkv/proj weights or biases are computed, not parameters")
            return None
        x, num_heads = p["x"], p["num_heads"]
        shape = tuple(ctx.spec(x).shape)
        c = shape[-1]
        d = _head_dim(p, c)
        if d is None or tuple(ctx.spec(p["qkv_weight"]).shape) != (3 * num_heads * d, c) \
                or ctx.spec(p["proj_weight"]).shape[1] != num_heads * d:
            ctx.boundary(node, "window attention whose number of heads or weight shapes fxprune cannot read")
            return None
        dim = len(shape) - 1
        in_ids = ctx.ids_on(x, dim, node)
        ctx.mark(in_ids, _STREAM)
        heads = ctx.new_ids(num_heads)
        per_row = np.repeat(heads, d)
        ctx.member(weights["qkv_weight"], 1, in_ids, "in", node)
        ctx.member(weights["qkv_weight"], 0, np.tile(per_row, 3), "out", node)
        if weights["qkv_bias"] is not None:
            ctx.member(weights["qkv_bias"], 0, np.tile(per_row, 3), "channel", node)
        ctx.member(weights["proj_weight"], 1, per_row, "in", node)
        out_ids = ctx.member(weights["proj_weight"], 0, None, "out", node, size=ctx.spec(p["proj_weight"]).shape[0])
        ctx.mark(out_ids, _STREAM)
        if weights["proj_bias"] is not None:
            ctx.member(weights["proj_bias"], 0, out_ids, "channel", node)
        why = _heads_axis(ctx, p["bias"], num_heads, heads, node, "relative position bias")
        if why is None and p["logit_scale"] is not None:
            why = _heads_axis(ctx, p["logit_scale"], num_heads, heads, node, "logit scale")
        if why is not None:
            ctx.mark(heads, f"{node.name}: heads stay: {why}")
        return Layout(dim, out_ids)

    def rewrite(self, rctx, node):
        p = _swin_parts(node)
        key = (get_attr_target(p["proj_weight"]), 1)
        if key not in rctx.channels.members:
            return  # a boundary
        d = _head_dim(p, rctx.spec(p["x"]).shape[-1])
        kept = rctx.kept_count(rctx.channels.members[key].ids) // d
        if kept == p["num_heads"]:
            return
        node.target = pruned_shifted_window_attention
        set_arg(node, 5, "num_heads", kept)
        node.kwargs = {**node.kwargs, "head_dim": d}


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
    """torchvision's MaxViT `RelativePositionalMultiHeadAttention` with `n_heads` heads of
    `head_dim` on a `feat_dim` stream (n_heads * head_dim may be less than feat_dim): the same
    tensors and scale (feat_dim ** -0.5, as torchvision computes it), the output reshaped to the
    kept heads' width before `merge`."""

    def __init__(self, attn: nn.Module, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, attn.head_dim
        self.size, self.max_seq_len, self.scale_factor = attn.size, attn.max_seq_len, attn.scale_factor
        self.to_qkv, self.merge = attn.to_qkv, attn.merge
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index)
        self.to_qkv.out_features = 3 * n_heads * attn.head_dim
        self.merge.in_features = n_heads * attn.head_dim

    def get_relative_positional_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.max_seq_len, self.max_seq_len, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        B, G, P, _ = x.shape
        H, DH = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4)
        k = k.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4) * self.scale_factor
        v = v.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4)
        attn = F.softmax(torch.einsum("bghid,bghjd->bghij", q, k) + self.get_relative_positional_bias(), dim=-1)
        out = torch.einsum("bghij,bghjd->bghid", attn, v).permute(0, 1, 3, 2, 4).reshape(B, G, P, H * DH)
        return self.merge(out)


class RelativePositionalAttentionModule(OpHandler):
    """MaxViT's `RelativePositionalMultiHeadAttention` (a leaf of the trace: its code reshapes the
    heads' output to the input width, which the rewrite must change): a head owns its q, k, v rows
    of `to_qkv`, its `merge` columns and its column of `relative_position_bias_table`."""

    def analyze(self, ctx, node):
        attn, t = ctx.get_submodule(node.target), node.target
        x = node.args[0]
        dim = ctx.spec(x).ndim - 1
        in_ids = ctx.ids_on(x, dim, node)
        ctx.mark(in_ids, _STREAM_MAXVIT)
        heads, out_ids = head_members(ctx, node, in_ids, f"{t}.to_qkv", attn.to_qkv.bias is not None, f"{t}.merge",
                                      attn.merge.out_features, attn.n_heads, attn.head_dim)
        ctx.mark(out_ids, _STREAM_MAXVIT)
        if attn.merge.bias is not None:
            ctx.member(f"{t}.merge.bias", 0, out_ids, "channel", node)
        ctx.member(f"{t}.relative_position_bias_table", 1, heads, "channel", node)
        node.meta[WEIGHT_SOURCE] = f"{t}.to_qkv.weight"  # its MACs scale with the kept heads
        return Layout(dim, out_ids)

    def rewrite(self, rctx, node):
        attn = rctx.get_submodule(node.target)
        kept = rctx.kept_count(rctx.channels.members[(f"{node.target}.merge.weight", 1)].ids) // attn.head_dim
        if kept == attn.n_heads:
            return
        parent, _, name = node.target.rpartition(".")
        setattr(rctx.get_submodule(parent) if parent else rctx.gm, name,
                PrunedRelativePositionalMultiHeadAttention(attn, kept))
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
except ImportError:  # pragma: no cover
    _swin = _maxvit = None
if _swin is not None:
    register_function(_swin.shifted_window_attention)(ShiftedWindowAttentionFunction)
    register_function(_swin._get_relative_position_bias)(RelativePositionBiasFunction)
    register_function(_swin._patch_merging_pad)(PatchMergingPad)
if _maxvit is not None:
    for _cls in (_maxvit.RelativePositionalMultiHeadAttention, PrunedRelativePositionalMultiHeadAttention):
        register_leaf_module(_cls, "MaxViT attention: its heads are pruned whole (passes/ops/window_attention.py)")
        register_module(_cls)(RelativePositionalAttentionModule)
register_function(pruned_shifted_window_attention)(ShiftedWindowAttentionFunction)

__all__ = ["PrunedRelativePositionalMultiHeadAttention", "pruned_shifted_window_attention"]
