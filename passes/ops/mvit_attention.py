"""MViT's attention (torchvision `mvit_v1_b`, `mvit_v2_s`): whole heads are pruned.

torchvision's `MultiscaleAttention` splits `qkv(x)` into `num_heads` heads of `head_dim`, pools
q, k and v per head (`pool_q/k/v`: a depthwise Conv3d over the head_dim channels, or a pooling,
then a LayerNorm over head_dim; the same modules for every head), adds v2's decomposed relative
position terms (`rel_pos_h/w/t`: (positions, head_dim), shared by the heads) and v2's residual
pooling (`x += q`, per head), then reshapes the heads' output to `output_dim` and projects it with
`project`. Every per-head piece is shared by all heads or computed per head, so a head owns only its
q, k, v rows of `qkv` (three blocks of output_dim rows) and its columns of `project[0]`; removing it
removes its term from the sum the projection computes (the masked reference zeroes those columns,
role "in"), and the slim model computes with fewer heads of the same width and the same scale
1/sqrt(head_dim). The residual stream (the columns `qkv` reads, the rows `project` writes) stays.

Its code reshapes the heads' output to `self.output_dim`, which the rewrite must change, so the
module is traced as a leaf (registered here) and handled like MaxViT's attention; the rewrite puts a
`PrunedMultiscaleAttention` (the same submodules and tensors, `inner_dim` = kept heads x head_dim)
in its place. All of its MACs (qkv, the per-head pooling convs, q k^T, the relative position
einsums, attn v, the projection) scale with the number of heads: the node names `qkv.weight` for
the cost model (`WEIGHT_SOURCE`), whose dim 0 carries the heads and whose dim 1 (the stream) stays,
so the count is exact.

Its heads are not narrowed under ``heads="width"``: the pooling LayerNorms normalise over the head
width, and v2 adds the pooled q to attn v (residual pooling) and reads q's width in its
relative-position einsums, so a narrower head is not the original with positions switched off (no
exact masked reference); the handler registers whole heads whatever the option.

`RankAdjust` follows MViT's `_unsqueeze` / `_squeeze` (a size-1 dim added or removed around the
skip pooling and at the input). The video Swin3D's attention: `window_attention.py`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..context import Layout
from ..tracer import register_leaf_module
from .conv import WEIGHT_SOURCE
from .registry import OpHandler, get_arg, register_function, register_module
from .attention import head_members

_STREAM = "the residual stream of MViT's attention stays (its heads are pruned)"


class PrunedMultiscaleAttention(nn.Module):
    """torchvision's MViT `MultiscaleAttention` with `num_heads` heads of `head_dim` (num_heads *
    head_dim = `inner_dim`, which may be less than `output_dim`, the width `project` writes): the
    same submodules, tensors and scale."""

    def __init__(self, attn: nn.Module, num_heads: int):
        super().__init__()
        self.embed_dim, self.output_dim = attn.embed_dim, attn.output_dim
        self.num_heads, self.head_dim, self.scaler = num_heads, attn.head_dim, attn.scaler
        self.inner_dim = num_heads * attn.head_dim
        self.residual_pool, self.residual_with_cls_embed = attn.residual_pool, attn.residual_with_cls_embed
        self.qkv, self.project = attn.qkv, attn.project
        self.pool_q, self.pool_k, self.pool_v = attn.pool_q, attn.pool_k, attn.pool_v
        self.rel_pos_h, self.rel_pos_w, self.rel_pos_t = attn.rel_pos_h, attn.rel_pos_w, attn.rel_pos_t
        self.qkv.out_features = 3 * self.inner_dim
        self.project[0].in_features = self.inner_dim

    def forward(self, x: Tensor, thw: tuple[int, int, int]) -> tuple[Tensor, tuple[int, int, int]]:
        from torchvision.models.video.mvit import _add_rel_pos, _add_shortcut

        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).transpose(1, 3).unbind(dim=2)
        if self.pool_k is not None:
            k, k_thw = self.pool_k(k, thw)
        else:
            k_thw = thw
        if self.pool_v is not None:
            v = self.pool_v(v, thw)[0]
        if self.pool_q is not None:
            q, thw = self.pool_q(q, thw)
        attn = torch.matmul(self.scaler * q, k.transpose(2, 3))
        if self.rel_pos_h is not None and self.rel_pos_w is not None and self.rel_pos_t is not None:
            attn = _add_rel_pos(attn, q, thw, k_thw, self.rel_pos_h, self.rel_pos_w, self.rel_pos_t)
        x = torch.matmul(attn.softmax(dim=-1), v)
        if self.residual_pool:
            _add_shortcut(x, q, self.residual_with_cls_embed)
        x = x.transpose(1, 2).reshape(B, -1, self.inner_dim)
        return self.project(x), thw


class MultiscaleAttentionModule(OpHandler):
    """MViT's `MultiscaleAttention` (a leaf of the trace): a head owns its q, k, v rows of `qkv` and
    its columns of `project[0]` (module docstring)."""

    def analyze(self, ctx, node):
        attn, t = ctx.get_submodule(node.target), node.target
        x = get_arg(node, 0, "x")
        project = attn.project[0] if isinstance(attn.project, nn.Sequential) else None
        if not isinstance(project, nn.Linear) or not isinstance(attn.qkv, nn.Linear) \
                or attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim \
                or project.in_features != attn.num_heads * attn.head_dim:
            ctx.boundary(node, "MViT attention whose projections fxprune cannot read")
            return None
        dim = ctx.spec(x).ndim - 1
        in_ids = ctx.ids_on(x, dim, node)
        ctx.mark(in_ids, _STREAM)
        heads = head_members(ctx, node, in_ids, f"{t}.qkv.weight", f"{t}.qkv.bias" if attn.qkv.bias is not None
                             else None, f"{t}.project.0.weight", project.out_features, attn.num_heads, attn.head_dim,
                             attn.head_dim, "whole")
        out_ids = heads.out_ids
        ctx.mark(out_ids, _STREAM)
        if project.bias is not None:
            ctx.member(f"{t}.project.0.bias", 0, out_ids, "channel", node)
        node.meta[WEIGHT_SOURCE] = f"{t}.qkv.weight"  # all its MACs scale with the kept heads
        return (Layout(dim, out_ids), None)

    def rewrite(self, rctx, node):
        key = (f"{node.target}.project.0.weight", 1)
        if key not in rctx.channels.members:
            return  # a boundary
        attn = rctx.get_submodule(node.target)
        kept = rctx.kept_count(rctx.channels.members[key].ids) // attn.head_dim
        if kept == attn.num_heads:
            return
        parent, _, name = node.target.rpartition(".")
        setattr(rctx.get_submodule(parent) if parent else rctx.gm, name, PrunedMultiscaleAttention(attn, kept))
        rctx.forget_module(node.target)


class RankAdjust(OpHandler):
    """MViT's wrapped `_unsqueeze(x, target_dim, expand_dim) -> (x, x.dim())` and
    `_squeeze(x, target_dim, expand_dim, tensor_dim)`: a dim of size 1 is added (or removed) at
    `expand_dim` when the rank differs from `target_dim` by one (the skip pooling of a [B, N, C]
    stream, the [B, C, T, H, W] video input). Channels move with the dims around them; they read
    no channel count, so the slim model needs no rewrite."""

    def analyze(self, ctx, node):
        x = get_arg(node, 0, "x")
        lay = ctx.layout(x)
        if not isinstance(lay, Layout):
            return None
        expand = get_arg(node, 2, "expand_dim")
        in_nd = ctx.spec(x).ndim
        out = ctx.spec(node)
        out_nd = (out[0] if isinstance(out, tuple) else out).ndim
        if not isinstance(expand, int):
            ctx.boundary(node, "MViT rank change at a computed dim")
            return None
        dim = lay.dim
        if out_nd == in_nd + 1:
            dim += dim >= expand % out_nd
        elif out_nd == in_nd - 1:
            if dim == expand % in_nd:
                ctx.boundary(node, "MViT squeezes the channel dim")
                return None
            dim -= dim > expand % in_nd
        moved = Layout(dim, lay.ids)
        return (moved, None) if isinstance(out, tuple) else moved


try:  # torchvision is optional
    from torchvision.models.video import mvit as _mvit
except ImportError:  # pragma: no cover
    _mvit = None
if _mvit is not None:
    register_function(_mvit._unsqueeze, _mvit._squeeze)(RankAdjust)
_CLASSES = (PrunedMultiscaleAttention,) + (() if _mvit is None else (_mvit.MultiscaleAttention,))
for _cls in _CLASSES:
    register_leaf_module(_cls, "MViT attention: its heads are pruned whole (passes/ops/mvit_attention.py)")
    register_module(_cls)(MultiscaleAttentionModule)

__all__ = ["PrunedMultiscaleAttention"]
