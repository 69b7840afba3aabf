"""nn.MultiheadAttention: whole heads are pruned.

A head h owns rows [h*d, (h+1)*d) of each of the q, k and v blocks of `in_proj_weight` (and of
`in_proj_bias`) and the same columns of `out_proj.weight`; removing it removes its term from the
sum the output projection computes, so the masked reference zeroes those output-projection columns
(role "in") and the slim model computes with fewer heads of the same width. The embedding dim (the
columns `in_proj_weight` reads and the rows `out_proj` writes) stays: every transformer normalises
over it with a LayerNorm anyway, and it keeps the attention's MACs a product of the kept heads'
fraction (exact in the cost model).

Heads stay where pruning them would change what the module computes or returns: separate
kdim/vdim projections, `add_bias_kv`, `add_zero_attn`, masks or `is_causal` passed, or averaged
attention weights that the code reads (`need_weights` left True and output 1 used).
nn.MultiheadAttention cannot hold fewer heads than `embed_dim` allows, so the rewrite puts a
`PrunedMultiheadAttention` (same tensors, same call signature, plain ops) in its place.

Swin's and MaxViT's window attention heads: `window_attention.py`.
"""
from __future__ import annotations

import operator

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import Layout
from .registry import OpHandler, get_arg, register_module

_STREAM = "the embedding dim of nn.MultiheadAttention stays (its heads are pruned)"


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with `num_heads` heads of `head_dim` on an `embed_dim` stream, where
    num_heads * head_dim may be less than embed_dim. Called like nn.MultiheadAttention (self or
    cross attention, no masks); returns (output, None)."""

    def __init__(self, mha: nn.MultiheadAttention, num_heads: int):
        super().__init__()
        self.embed_dim, self.head_dim, self.num_heads = mha.embed_dim, mha.head_dim, num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.out_proj.in_features = num_heads * mha.head_dim

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("PrunedMultiheadAttention takes no masks (fxprune kept the heads of such calls)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)

        def heads(x, w, b):
            n, length, _ = x.shape
            return F.linear(x, w, b).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v),
                                             dropout_p=self.dropout if self.training else 0.0)
        n, _, length, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _unsupported(mha: nn.MultiheadAttention, node: fx.Node) -> str | None:
    if not mha._qkv_same_embed_dim:
        return "separate kdim/vdim projections"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    if any(get_arg(node, i, n) not in (None, False) for i, n in
           ((3, "key_padding_mask"), (5, "attn_mask"), (7, "is_causal"))):
        return "a mask or is_causal"
    if get_arg(node, 4, "need_weights", True) is not False and _weights_read(node):
        return "its attention weights (averaged over heads) are used"
    return None


def _weights_read(node: fx.Node) -> bool:
    """Anything but `out = mha(...)[0]` (and an unused `[1]`) reads the attention weights."""
    for user in node.users:
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if index == 0 or (index == 1 and not user.users):
            continue
        return True
    return False


@register_module(nn.MultiheadAttention)
class MultiheadAttentionModule(OpHandler):
    def analyze(self, ctx, node):
        mha = ctx.get_submodule(node.target)
        t = node.target
        query = get_arg(node, 0, "query")
        inputs = [query, get_arg(node, 1, "key"), get_arg(node, 2, "value")]
        dim = ctx.spec(query).ndim - 1
        in_ids = None
        for x in inputs:
            ids = ctx.ids_on(x, ctx.spec(x).ndim - 1, node)
            ctx.mark(ids, _STREAM)
            if in_ids is None:
                in_ids = ids
            else:
                ctx.couple(in_ids, ids)  # q, k and v read the same columns
        heads = ctx.new_ids(mha.num_heads)
        per_row = np.repeat(heads, mha.head_dim)
        ctx.member(f"{t}.in_proj_weight", 1, in_ids, "in", node)
        ctx.member(f"{t}.in_proj_weight", 0, np.tile(per_row, 3), "out", node)
        if mha.in_proj_bias is not None:
            ctx.member(f"{t}.in_proj_bias", 0, np.tile(per_row, 3), "channel", node)
        ctx.member(f"{t}.out_proj.weight", 1, per_row, "in", node)
        out_ids = ctx.member(f"{t}.out_proj.weight", 0, None, "out", node, size=mha.embed_dim)
        ctx.mark(out_ids, _STREAM)
        if mha.out_proj.bias is not None:
            ctx.member(f"{t}.out_proj.bias", 0, out_ids, "channel", node)
        why = _unsupported(mha, node)
        if why is not None:
            ctx.mark(heads, f"{node.name}: heads stay: {why}")
        return (Layout(dim, out_ids), None)

    def rewrite(self, rctx, node):
        ids = rctx.channels.members[(f"{node.target}.out_proj.weight", 1)].ids
        mha = rctx.get_submodule(node.target)
        kept = rctx.kept_count(ids) // mha.head_dim
        if kept == mha.num_heads:
            return
        parent, _, name = node.target.rpartition(".")
        setattr(rctx.get_submodule(parent) if parent else rctx.gm, name, PrunedMultiheadAttention(mha, kept))
        rctx.forget_module(node.target)


__all__ = ["PrunedMultiheadAttention"]
