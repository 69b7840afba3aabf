"""Channel counts a GPU's tensor cores run well: multiples of 8 (fp16/bf16 tiles).

Why this exists: a slim model whose convolutions keep, say, 45 of 64 channels makes cuDNN fall
back from its tensor-core kernels, and it can run *slower* than the original. Measured on an H200
(bf16, channels_last, resnet50, batch 64; docs/benchmarks.md, "Latency targets (GPU)"): `uniform`
at half the FLOPs, with counts that are not multiples of 8, ran 0.70-0.77x the original's speed;
the same MACs with `round_to=8` ran 1.18x, with `round_to="auto"` 1.73x on CUDA-graph replays.
`compress` therefore warns when a model that will run on a GPU (its parameters are on CUDA, or
latency is measured on ``device="cuda"``) is cut to such counts with `round_to=None`.
"""
from __future__ import annotations

import warnings

from torch import nn

TILE = 8  # channels per fp16/bf16 tensor-core tile edge (cuDNN's alignment for fast kernels)


class TensorCoreWarning(UserWarning):
    """A slim model for a GPU keeps channel counts that are not multiples of 8."""


def misaligned_groups(channels, plan) -> list[tuple[str, int, int]]:
    """(leading layer, kept channels, original channels) of every group that `plan` cuts from a
    multiple of 8 to a count that is not one."""
    out = []
    for gi, kept_units in plan.keep.items():
        g = channels.groups[gi]
        kept = len(kept_units) * max(g.unit_channels, 1)
        if g.size % TILE == 0 and kept % TILE and 0 < kept < g.size:
            out.append((str(g.leading.target), kept, g.size))
    return out


def runs_on_gpu(model: nn.Module, device) -> bool:
    """The model's parameters are on CUDA, or latency is measured on a CUDA device."""
    on = str(device or "")
    return on.startswith("cuda") or any(p.is_cuda for p in model.parameters())


def warn_if_misaligned(model: nn.Module, device, round_to, channels, plan, method: str = "",
                       rounds: bool = True) -> dict | None:
    """Warn (`TensorCoreWarning`) and return the report's note when a GPU model gets counts that are
    not multiples of 8 with round_to None; None otherwise. `rounds`: the method takes round_to
    (else the advice names methods that do: gate_decorator and gal choose their own counts)."""
    if round_to is not None or not runs_on_gpu(model, device):
        return None
    groups = misaligned_groups(channels, plan)
    if not groups:
        return None
    shown = ", ".join(f"{name} {kept}/{size}" for name, kept, size in groups[:4])
    more = f" and {len(groups) - 4} more" if len(groups) > 4 else ""
    if rounds:
        advice = (f"For a model that runs on a GPU pass round_to={TILE} (or, for a FLOPs target, round_to='auto' "
                  "with device='cuda')")
    else:
        advice = (f"{method or 'This method'} does not take round_to: expect these layers to run slower on a GPU, or "
                  f"use a method that does (l1, l2, bn_scale, uniform, metapruning) with round_to={TILE}")
    message = (f"{len(groups)} channel groups keep a count that is not a multiple of {TILE} ({shown}{more}); on GPU "
               "tensor cores such layers can run slower than the original's (measured 0.70x at half the FLOPs on "
               f"an H200). {advice}")
    warnings.warn(message, TensorCoreWarning, stacklevel=3)
    return {"groups_not_multiple_of_8": len(groups), "examples": [list(g) for g in groups[:4]]}
