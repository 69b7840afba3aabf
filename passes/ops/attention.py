"""nn.MultiheadAttention: whole heads are pruned, or every head is narrowed (the `heads` option).

``heads="whole"`` (the default): a head h owns rows [h*d, (h+1)*d) of each of the q, k and v blocks of `in_proj_weight` (and of
`in_proj_bias`) and the same columns of `out_proj.weight`; removing it removes its term from the
sum the output projection computes, so the masked reference zeroes those output-projection columns
(role "in") and the slim model computes with fewer heads of the same width. The embedding dim (the
columns `in_proj_weight` reads and the rows `out_proj` writes) stays: every transformer normalises
over it with a LayerNorm anyway, and it keeps the attention's MACs a product of the kept heads'
fraction (exact in the cost model).

``heads="width"``: every head stays and keeps the same positions. Position j of the q and k blocks
of every head is one unit (q and k must keep the same positions: their dot product sums over
them); position j of the v block of every head is another, with the out-projection columns it
feeds. Every head so keeps the same q/k count and the same v count (the reshape to (B, H, N, d)
needs it). The masked reference zeroes the removed q, k and v rows of `in_proj_weight` and
`in_proj_bias` (role "in"): a zero q/k position adds nothing to q k^T and a zero v position gives a
zero output column; the slim attention scales the scores by 1/sqrt(original head_dim), so it equals
the reference. The attention's MACs are two parts (the q and k projections and q k^T; the v
projection, attn v and the output projection), each a product of its kept fraction: the node lists
them for the cost model (`cost.MACS_TERMS`, shares from the query and key lengths), so the count is
exact. ``heads="auto"``: width where head_dim >= num_heads (more units than whole heads), whole
elsewhere. Whole heads and widths are not combined: a unit is one set of channels, and a kept
(head, position) pair would need both its head's unit and its position's.

Heads stay where pruning them would change what the module computes or returns: separate
kdim/vdim projections, `add_bias_kv`, `add_zero_attn`, masks or `is_causal` passed, or averaged
attention weights that the code reads (`need_weights` left True and output 1 used).
nn.MultiheadAttention cannot hold fewer heads than `embed_dim` allows, so the rewrite puts a
`PrunedMultiheadAttention` (same tensors, same call signature, plain ops) in its place.

With ``layernorm="prune"`` (`norm.py`) the embedding dim is pruned too (the residual stream of a
transformer, through its LayerNorms): the columns `in_proj_weight` reads and the rows `out_proj`
writes are then ordinary "in" / "out" members of the stream's group, and the rewrite puts a
`PrunedMultiheadAttention` in place whenever the stream lost channels.

Swin's and MaxViT's window attention heads (the same `heads` option, through `head_members`):
`window_attention.py`; MViT's (whole heads): `mvit_attention.py`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import Layout
from ..cost import MACS_TERMS
from .registry import OpHandler, get_arg, register_module

HEADS_MODES = ("whole", "width", "auto")

_STREAM = "the embedding dim of nn.MultiheadAttention stays (its heads are pruned)"


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with `num_heads` heads on an `embed_dim` stream, each with `qk_dim` q/k
    positions and `v_dim` v positions (num_heads * head width may be less than embed_dim). The
    scores are scaled by `scale` (1/sqrt of the original head width: a head pruned to fewer q/k
    positions computes what the masked original computes). Called like nn.MultiheadAttention (self
    or cross attention, no masks); returns (output, None)."""

    def __init__(self, mha: nn.MultiheadAttention, num_heads: int, qk_dim: int | None = None,
                 v_dim: int | None = None):
        super().__init__()
        self.embed_dim, self.head_dim, self.num_heads = mha.embed_dim, mha.head_dim, num_heads
        self.qk_dim = mha.head_dim if qk_dim is None else qk_dim
        self.v_dim = mha.head_dim if v_dim is None else v_dim
        self.scale = getattr(mha, "scale", None) or mha.head_dim ** -0.5
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.out_proj.in_features = num_heads * self.v_dim
        self.out_proj.out_features = self.out_proj.weight.shape[0]  # less than embed_dim: a pruned stream

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("PrunedMultiheadAttention takes no masks (fxprune kept the heads of such calls)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        qk, v = self.num_heads * self.qk_dim, self.num_heads * self.v_dim
        w_q, w_k, w_v = self.in_proj_weight.split([qk, qk, v])
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.split([qk, qk, v])

        def heads(x, w, b, width):
            n, length, _ = x.shape
            return F.linear(x, w, b).view(n, length, self.num_heads, width).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(query, w_q, b_q, self.qk_dim), heads(key, w_k, b_k, self.qk_dim), heads(value, w_v, b_v, self.v_dim),
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        n, _, length, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, v))
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


def heads_mode(ctx, num_heads: int, head_dim: int) -> str:
    """'whole' or 'width' for one attention under the analysis' `heads` option (module docstring)."""
    mode = getattr(ctx, "heads", "whole")
    if mode == "auto":
        return "width" if head_dim >= num_heads else "whole"
    return mode


def _lengths(ctx, node: fx.Node, mha: nn.MultiheadAttention) -> tuple[int, int]:
    """The query and key lengths of an nn.MultiheadAttention call."""
    q, k = (tuple(ctx.spec(get_arg(node, i, n)).shape) for i, n in ((0, "query"), (1, "key")))
    if len(q) == 2:
        return q[0], k[0]
    if mha.batch_first:
        return q[1], k[1]
    return q[0], k[0]


def attention_terms(lq: int, lk: int, e_in: int, e_out: int, heads: "HeadMembers") -> list:
    """MACS_TERMS of one attention with a fused q/k/v projection, `lq` queries, `lk` keys, an
    `e_in`-wide input and an `e_out`-wide output: the q and k projections scale with the kept input
    stream and q/k rows, q k^T with the q/k rows, the v projection with the stream and the v rows,
    attn v with the v rows, the output projection with the v rows and the kept output stream. Every
    part is a token count times heads x head width (common factors such as the batch and the windows
    cancel in the shares), so the count is exact however q/k, v and the stream are pruned."""
    parts = [(lq * e_in + lk * e_in, [heads.in_ids, heads.qk_rows]), (lq * lk, [heads.qk_rows]),
             (lk * e_in, [heads.in_ids, heads.v_rows]), (lq * lk, [heads.v_rows]),
             (lq * e_out, [heads.out_ids, heads.v_rows])]
    total = sum(p for p, _ in parts)
    return [(p / total, ids) for p, ids in parts]


@dataclass
class HeadMembers:
    """What `head_members` registered: `units` (the heads, or with ``"width"`` the q/k positions then
    the v positions), the ids of the q (= k) rows and of the v rows (= output-projection columns),
    and the input / output stream ids."""

    mode: str
    units: np.ndarray
    qk_rows: np.ndarray
    v_rows: np.ndarray
    in_ids: np.ndarray
    out_ids: np.ndarray


def head_members(ctx, node: fx.Node, in_ids: np.ndarray, qkv_weight: str, qkv_bias: str | None, proj_weight: str,
                 proj_out: int, n_heads: int, qk_dim: int, v_dim: int, mode: str,
                 out_ids: np.ndarray | None = None) -> HeadMembers:
    """The members of an attention with one fused q/k/v projection (`qkv_weight`: the q, k and v
    blocks of n_heads x qk_dim, n_heads x qk_dim and n_heads x v_dim rows) and an output projection
    (`proj_weight`, `proj_out` rows; `out_ids` if its rows are known already).

    ``mode="whole"``: a head owns its rows of each block (role "out") and the same projection
    columns (role "in"). ``"width"``: position j of the q and k blocks of every head is one unit,
    position j of the v block of every head another, with the projection columns it feeds; all role
    "in" (module docstring). With ``"width"`` the k rows and the v rows are gate-free
    (`ctx.gate_free`): a gate on the q rows and on the projection columns alone keeps the output
    linear in it (`param_sites`)."""
    ctx.member(qkv_weight, 1, in_ids, "in", node)
    if mode == "width":
        qk, v = ctx.new_ids(qk_dim), ctx.new_ids(v_dim)  # positions, the same in every head
        qk_rows, v_rows, units = np.tile(qk, n_heads), np.tile(v, n_heads), np.concatenate([qk, v])
        role = bias_role = "in"  # the masked reference zeroes the removed rows
    else:
        heads = ctx.new_ids(n_heads)
        qk_rows, v_rows, units = np.repeat(heads, qk_dim), np.repeat(heads, v_dim), heads
        role, bias_role = "out", "channel"
    rows = np.concatenate([qk_rows, qk_rows, v_rows])
    ctx.member(qkv_weight, 0, rows, role, node)
    if qkv_bias is not None:
        ctx.member(qkv_bias, 0, rows, bias_role, node)
    ctx.member(proj_weight, 1, v_rows, "in", node)
    if mode == "width":
        free = np.arange(len(rows)) >= len(qk_rows)  # k and v rows
        for target in (qkv_weight, qkv_bias):
            if target is not None:
                ctx.gate_free[(target, 0)] = free
    out = ctx.member(proj_weight, 0, out_ids, "out", node, size=proj_out)
    return HeadMembers(mode, units, qk_rows, v_rows, in_ids, out)


def kept_heads(kept_rows: np.ndarray, n_heads: int, qk_dim: int, v_dim: int) -> tuple[int, int, int]:
    """(heads, q/k width, v width) a slim attention holds, from the kept rows of its fused q/k/v
    projection (q, k and v blocks, as `head_members` registers them): a head stays while any of
    its q or v rows does, and every kept head keeps the same count (whole heads, or equal widths)."""
    q = kept_rows[:n_heads * qk_dim].reshape(n_heads, qk_dim)
    v = kept_rows[2 * n_heads * qk_dim:].reshape(n_heads, v_dim)
    heads = int((q.any(1) | v.any(1)).sum())
    return heads, int(q.sum()) // max(heads, 1), int(v.sum()) // max(heads, 1)


@register_module(nn.MultiheadAttention)
class MultiheadAttentionModule(OpHandler):
    def analyze(self, ctx, node):
        mha = ctx.get_submodule(node.target)
        t = node.target
        query = get_arg(node, 0, "query")
        inputs = [query, get_arg(node, 1, "key"), get_arg(node, 2, "value")]
        dim = ctx.spec(query).ndim - 1
        stream_stays = getattr(ctx, "layernorm", "boundary") != "prune"
        in_ids = None
        for x in inputs:
            ids = ctx.ids_on(x, ctx.spec(x).ndim - 1, node)
            if stream_stays:
                ctx.mark(ids, _STREAM)
            if in_ids is None:
                in_ids = ids
            else:
                ctx.couple(in_ids, ids)  # q, k and v read the same columns
        node.meta.pop(MACS_TERMS, None)  # an earlier analysis of this graph may have set it
        mode = heads_mode(ctx, mha.num_heads, mha.head_dim)
        heads = head_members(ctx, node, in_ids, f"{t}.in_proj_weight", f"{t}.in_proj_bias" if mha.in_proj_bias
                             is not None else None, f"{t}.out_proj.weight", mha.embed_dim, mha.num_heads,
                             mha.head_dim, mha.head_dim, mode)
        out_ids = heads.out_ids
        if stream_stays:
            ctx.mark(out_ids, _STREAM)
        if mode == "width" or not stream_stays:
            lq, lk = _lengths(ctx, node, mha)
            node.meta[MACS_TERMS] = attention_terms(lq, lk, mha.embed_dim, mha.embed_dim, heads)
        if mha.out_proj.bias is not None:
            ctx.member(f"{t}.out_proj.bias", 0, out_ids, "channel", node)
        why = _unsupported(mha, node)
        if why is not None:
            ctx.mark(heads.units, f"{node.name}: heads stay: {why}")
        return (Layout(dim, out_ids), None)

    def rewrite(self, rctx, node):
        mha = rctx.get_submodule(node.target)
        h, d, e = mha.num_heads, mha.head_dim, mha.embed_dim
        kept = rctx.kept(rctx.channels.members[(f"{node.target}.in_proj_weight", 0)].ids)
        heads, qk_dim, v_dim = kept_heads(kept, h, d, d)
        stream = (mha.in_proj_weight.shape[1], mha.out_proj.weight.shape[0])  # sliced already
        if (heads, qk_dim, v_dim) == (h, d, d) and stream == (e, e):
            return
        parent, _, name = node.target.rpartition(".")
        setattr(rctx.get_submodule(parent) if parent else rctx.gm, name,
                PrunedMultiheadAttention(mha, heads, qk_dim, v_dim))
        rctx.forget_module(node.target)


__all__ = ["PrunedMultiheadAttention"]
