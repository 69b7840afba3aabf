"""Verification: the slim model must compute what the masked original computes.

Both run in eval mode (dropout off, BN on running statistics) on the same random inputs shaped
like the example inputs; every tensor leaf of the (nested) outputs is compared. The error is
relative to the reference's magnitude, because randomly initialised deep nets produce outputs
anywhere from 1e-12 to 1e6.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import VerificationError
from .inputs import ExampleInputs, output_leaves
from .shapes import standard_attention_path

DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class VerificationResult:
    max_abs_error: float
    max_rel_error: float
    worst_output: str
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Eval mode for the duration, then every submodule's own flag back."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def compare(reference: nn.Module, slim: nn.Module, inputs: ExampleInputs, tolerance: float | None = None,
            seed: int = 0) -> VerificationResult:
    gen = torch.Generator().manual_seed(seed)
    x = inputs.random_like(gen)
    with torch.no_grad(), eval_mode(reference, slim), standard_attention_path():
        ref_out = output_leaves(x.call(reference))
        slim_out = output_leaves(x.call(slim))
    if [p for p, _ in ref_out] != [p for p, _ in slim_out]:
        raise VerificationError(float("inf"), 0.0, "output structure changed")
    worst = ("", 0.0, 0.0)
    dtype = torch.float32
    for (path, a), (_, b) in zip(ref_out, slim_out):
        if a.shape != b.shape:
            raise VerificationError(float("inf"), 0.0, f"{path} (shape {tuple(a.shape)} became {tuple(b.shape)})")
        if not a.is_floating_point():
            err = float((a != b).any())
            rel = err
        else:
            dtype = a.dtype
            diff = (a.double() - b.double()).abs()
            err = float(diff.max()) if diff.numel() else 0.0
            scale = max(float(a.double().abs().max()) if a.numel() else 0.0, 1e-30)
            rel = err / scale if err else 0.0
        if rel >= worst[2]:
            worst = (path, err, rel)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-4)
    return VerificationResult(worst[1], worst[2], worst[0], tol)


def verify(reference: nn.Module, slim: nn.Module, inputs: ExampleInputs, tolerance: float | None = None,
           seed: int = 0) -> VerificationResult:
    """`compare`, raising VerificationError when the error is above tolerance."""
    result = compare(reference, slim, inputs, tolerance, seed)
    if not result.passed:
        raise VerificationError(result.max_rel_error, result.tolerance, result.worst_output)
    return result


def randomize_degenerate_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """For randomly initialised models only: give zero-initialised weights (ViT heads) small random
    values and tiny layer scales (ConvNeXt) the value 1, so an output comparison cannot pass merely
    because a whole path outputs ~0. Modifies `model` in place and returns it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0 or not p.is_floating_point():
                continue
            if p.ndim >= 2 and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
            elif "layer_scale" in name or name.rsplit(".", 1)[-1] == "gamma":
                p.fill_(1.0)
    return model
