"""Data-free importance of each unit of each prunable group.

* ``l1`` / ``l2``: norms of every weight slice the unit owns — the filters that produce it and the
  input columns that read it, across all layers of the group (Torch-Pruning's group norm).
* ``bn_scale``: Network Slimming's |gamma| of the norm layers in the group (summed over them);
  a group without a norm affine falls back to ``l1``.
* ``random``: seeded uniform noise (a baseline).
* ``uniform``: ``l1`` order inside each group; the selection keeps the same ratio everywhere.

Scores are per unit, higher = more important.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from passes.tensors import get_tensor

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _slice_norms(t: torch.Tensor, dim: int, p: int) -> np.ndarray:
    t = t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1)
    v = t.abs().sum(1) if p == 1 else t.pow(2).sum(1)
    return v.cpu().numpy().astype(np.float64)


def _norm_scores(analysis, group, p: int) -> np.ndarray:
    scores = np.zeros(group.n_units)
    for m in group.members:
        t = get_tensor(analysis.gm, m.target)
        if m.role == "channel" or t.ndim < 2:
            continue
        values = _slice_norms(t, m.dim, p)[m.positions]
        np.add.at(scores, m.unit_of_position, values)
    return np.sqrt(scores) if p == 2 else scores


def _bn_scores(analysis, group) -> np.ndarray | None:
    scores = np.zeros(group.n_units)
    found = False
    for m in group.members:
        owner, _, attr = m.target.rpartition(".")
        if attr != "weight" or not owner or not isinstance(analysis.gm.get_submodule(owner), _NORMS):
            continue
        t = get_tensor(analysis.gm, m.target).detach().float().abs().cpu().numpy()
        np.add.at(scores, m.unit_of_position, t[m.positions])
        found = True
    return scores if found else None


def group_scores(analysis, method: str, seed: int = 0) -> dict[int, np.ndarray]:
    """{group index: score per unit} for every prunable group."""
    rng = np.random.default_rng(seed)
    out = {}
    for g in analysis.prunable_groups:
        if method == "random":
            out[g.index] = rng.random(g.n_units)
        elif method == "l2":
            out[g.index] = _norm_scores(analysis, g, 2)
        elif method == "bn_scale":
            s = _bn_scores(analysis, g)
            out[g.index] = s if s is not None else _norm_scores(analysis, g, 1)
        else:  # l1, uniform
            out[g.index] = _norm_scores(analysis, g, 1)
    return out


def normalize(scores: np.ndarray) -> np.ndarray:
    """Per-group normalisation (divide by the mean) so groups of different scale compete fairly."""
    mean = scores.mean() if len(scores) else 0.0
    return scores / mean if mean > 0 else np.zeros_like(scores)
