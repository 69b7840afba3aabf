"""Verification: the slim model must compute what the masked original computes.

Both run in eval mode (dropout off, BN on running statistics) on the same random inputs shaped
like the example inputs; every tensor leaf of the (nested) outputs is compared. The error is
relative to the reference's magnitude, because randomly initialised deep nets produce outputs
anywhere from 1e-12 to 1e6.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import VerificationError
from .passes.inputs import ExampleInputs, output_leaves
from .passes.shapes import standard_attention_path

_HALF = {torch.float16, torch.bfloat16}
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class VerificationResult:
    max_abs_error: float
    max_rel_error: float
    worst_output: str
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_rel_error) and self.max_rel_error <= self.tolerance


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


def _leaf_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, str]:
    """(max abs error, error relative to the reference's finite magnitude, note) of one output leaf.

    Non-finite values are compared by position and value first: a NaN or inf in only one of the two,
    or a different inf, is an infinite error. Where both hold the same non-finite value the position
    is left out, and the rest is compared. NaN can never slip through a max() or a division.
    """
    if not a.is_floating_point():
        return (0.0, 0.0, "") if torch.equal(a, b) else (float("inf"), float("inf"), "integer values differ")
    a, b = a.double(), b.double()
    fin_a, fin_b = torch.isfinite(a), torch.isfinite(b)
    if not bool(fin_a.all()) or not bool(fin_b.all()):
        same_place = torch.equal(fin_a, fin_b)
        both = ~fin_a & ~fin_b
        same_value = same_place and bool(((a[both] == b[both]) | (a[both].isnan() & b[both].isnan())).all())
        if not same_value:
            n_ref, n_slim = int((~fin_a).sum()), int((~fin_b).sum())
            return float("inf"), float("inf"), (f"non-finite values differ: {n_ref} in the reference, "
                                                 f"{n_slim} in the slim model")
        if not bool(fin_a.any()):
            return float("inf"), float("inf"), "the reference output is non-finite everywhere: nothing to compare"
        a, b = a[fin_a], b[fin_a]
    if a.numel() == 0:
        return 0.0, 0.0, ""
    err = float((a - b).abs().max())
    scale = float(a.abs().max())
    if err == 0.0:
        return 0.0, 0.0, ""
    return err, (err / scale if scale > 0 else float("inf")), ""


def _has_non_finite(leaves) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for _, t in leaves)


def _run(reference: nn.Module, slim: nn.Module, x: ExampleInputs):
    with torch.no_grad(), eval_mode(reference, slim), standard_attention_path():
        return output_leaves(x.call(reference)), output_leaves(x.call(slim))


def _in_float32(*modules: nn.Module) -> list[nn.Module]:
    """float32 copies (the originals are not touched) for re-checking a half-precision overflow."""
    return [copy.deepcopy(m).float() for m in modules]


def compare(reference: nn.Module, slim: nn.Module, inputs: ExampleInputs, tolerance: float | None = None,
            seed: int = 0) -> VerificationResult:
    """Compare every output leaf of `reference` and `slim` on seeded random inputs shaped like `inputs`.

    A float16/bfloat16 reference that overflows (inf/NaN in its output) is compared again in float32
    on copies, at the float32 tolerance: its half-precision output proves nothing either way.
    """
    gen = torch.Generator().manual_seed(seed)
    x = inputs.random_like(gen)
    ref_out, slim_out = _run(reference, slim, x)
    if [p for p, _ in ref_out] != [p for p, _ in slim_out]:
        raise VerificationError(float("inf"), 0.0, "output structure changed")
    dtypes = {t.dtype for _, t in ref_out if t.is_floating_point()}
    note = ""
    if dtypes & _HALF and (_has_non_finite(ref_out) or _has_non_finite(slim_out)):
        ref32, slim32 = _in_float32(reference, slim)
        x32 = x.map_tensors(lambda t: t.float() if t.dtype in _HALF else t)
        ref_out, slim_out = _run(ref32, slim32, x32)
        dtypes, note = {torch.float32}, " (re-checked in float32: the half-precision original overflows)"
    worst = ("", 0.0, -1.0, "")
    for (path, a), (_, b) in zip(ref_out, slim_out):
        if a.shape != b.shape:
            raise VerificationError(float("inf"), 0.0, f"{path} (shape {tuple(a.shape)} became {tuple(b.shape)})")
        err, rel, why = _leaf_error(a, b)
        if rel > worst[2]:
            worst = (path, err, rel, why)
    dtype = next((d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64) if d in dtypes),
                 torch.float32)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-4)
    where = worst[0] + (f" ({worst[3]})" if worst[3] else "") + note
    return VerificationResult(worst[1], max(worst[2], 0.0), where, tol)


def verify(reference: nn.Module, slim: nn.Module, inputs: ExampleInputs, tolerance: float | None = None,
           seed: int = 0) -> VerificationResult:
    """`compare`, raising VerificationError when the error is above tolerance (or not finite)."""
    result = compare(reference, slim, inputs, tolerance, seed)
    if not result.passed:
        raise VerificationError(result.max_rel_error, result.tolerance, result.worst_output)
    return result


# A parameter whose every entry is below this in magnitude silences the path it scales (a residual
# branch's last BN gamma initialised to 0, a layer scale of 1e-6, a zero-initialised head): an
# output comparison through it cannot see what the rewrite did to that path.
DEGENERATE_BELOW = 1e-3


def sensitive_values(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """{parameter name: random value of normal size} for every floating parameter of `model` whose
    entries are all zero or tiny (|x| < DEGENERATE_BELOW), biases excepted (a zero bias silences
    nothing). A weight of 2+ dims gets N(0, 1/fan_in) values, a scale vector values in [0.5, 1.5],
    distinct per channel, so a wrong channel order shows. `model` is only read.

    Compress verifies the rewrite of a copy holding these values (the same plan, rewritten the same
    way), so that a residual branch which starts at zero still reaches the compared output."""
    gen = torch.Generator().manual_seed(seed)
    fresh: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.numel() == 0 or not p.is_floating_point() or ".parametrizations." in f".{name}"
                    or name.rsplit(".", 1)[-1] == "bias"):
                continue
            if float(p.detach().abs().max()) >= DEGENERATE_BELOW:
                continue
            if p.ndim >= 2:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(max(p[0].numel(), 1))
            else:
                value = 0.5 + torch.rand(p.shape, generator=gen)
            fresh[name] = value.to(dtype=p.dtype, device=p.device)
    return fresh


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
