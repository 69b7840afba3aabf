"""Torch-Pruning (``pip install torch-pruning``, the ``compare`` extra) on the same footing as fxprune.

Its recommended usage, as in its README and ``benchmarks/prunability/torchvision_pruning.py``:
``tp.pruner.BasePruner(model, example_inputs, importance=tp.importance.MagnitudeImportance(p=1), ...)``
with ``ignored_layers`` = the final classifier, then ``pruner.step()``. To compare like with
like, the run here uses

* ``MagnitudeImportance(p=1)`` (L1 filter norms, its default group reduction and normaliser
  ``mean``) and ``global_pruning=True``: fxprune's ``l1`` also ranks the channels of all groups
  together after a per-group normalisation;
* ``iterative_steps=1`` (one-shot, as fxprune), ``round_to`` as fxprune's;
* ``pruning_ratio`` searched so that the MACs the same counter (`count_macs`, FlopCounterMode)
  measures on the pruned model are at most the target, as close to it as the search gets
  (fxprune's selection has the same "at most" meaning).

Each try prunes a fresh deep copy (Torch-Pruning prunes in place); the time of a try is the
dependency-graph build plus ``step()``, not the copy, the search or the MAC count.

A `PrunerSetup` changes the call for one experiment or model family: ``global_pruning=False`` (every
group pruned by the same ratio), extra `BasePruner` arguments built on the copy being pruned, and a
fix-up after ``step()``. `torchvision_setup` gives Torch-Pruning's own recipes for torchvision's
attention models (ViT: ``round_to`` = heads and ``hidden_dim`` reset, its
``examples/torchvision_models/torchvision_pruning.py``; Swin, MaxViT, MViT: ``num_heads`` of the
fused q/k/v Linear and the head attributes reset, as its ``examples/transformers/prune_timm_vit.py``).

Example::

    >>> import torch, torchvision
    >>> from benches.harness.peer import torch_pruning_status, prune_to_macs
    >>> tp, why = torch_pruning_status()
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 224, 224)
    >>> res = prune_to_macs(model, x, 0.5) if tp else None
    >>> res is None or res.macs_fraction <= 0.5
    True
"""
from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from torch import nn

from fxprune.passes.inputs import ExampleInputs
from .memory import PeakMemory
from .metrics import count_macs, output_shapes

INSTALL_HINT = "pip install 'fxprune[compare]' (or pip install torch-pruning)"


def torch_pruning_status() -> tuple[Any, str]:
    """(the torch_pruning module or None, a message saying which version or why it is missing)."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        return None, f"Torch-Pruning is not installed ({exc}); the comparison is skipped: {INSTALL_HINT}"
    try:
        version = metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        version = getattr(tp, "__version__", "?")
    return tp, f"Torch-Pruning {version}"


def classifier_layers(model: nn.Module, inputs: ExampleInputs) -> list[nn.Module]:
    """The final classifier(s), which Torch-Pruning's usage leaves alone: every Linear whose
    out_features is the output's channel count (its scripts: ``out_features == 1000``), else the last
    such Conv."""
    shapes = output_shapes(model, inputs)
    classes = {s[1] for s in shapes if len(s) >= 2}
    linear = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in classes]
    if linear:
        return linear
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels in classes]
    return convs[-1:]


@dataclass(frozen=True)
class PrunerSetup:
    """How Torch-Pruning is called beyond this module's defaults (module docstring).

    `global_pruning`: rank all groups together (the default, like fxprune's ``l1``) or prune every
    group by the same ratio (False). `options(copy)`: extra `BasePruner` keyword arguments, built on
    the deep copy about to be pruned (``num_heads`` is keyed by that copy's modules); they override
    ``round_to``. `after_step(copy, pruner)`: fixes the copy up after ``step()`` (attributes its
    forward reads, such as ViT's ``hidden_dim``). `recipe`: a short description for the results."""

    global_pruning: bool = True
    options: Callable[[nn.Module], dict] | None = None
    after_step: Callable[[nn.Module, Any], None] | None = None
    recipe: str = "default"


def _vit_options(model: nn.Module) -> dict:
    return {"round_to": model.encoder.layers[0].num_heads}  # embed_dim stays divisible by the heads


def _vit_after(model: nn.Module, pruner) -> None:
    model.hidden_dim = model.conv_proj.out_channels  # its forward reshapes to hidden_dim


def _attention_layers(model: nn.Module) -> list:
    """(module, q/k/v Linear, heads attribute) of each torchvision window/MaxViT/MViT attention."""
    found = []
    for m in model.modules():
        kind = type(m).__name__
        if kind in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2", "ShiftedWindowAttention3d"):
            found.append((m, m.qkv, "num_heads"))
        elif kind == "RelativePositionalMultiHeadAttention":
            found.append((m, m.to_qkv, "n_heads"))
        elif kind == "MultiscaleAttention":
            found.append((m, m.qkv, "num_heads"))
    return found


def _heads_options(model: nn.Module) -> dict:
    return {"num_heads": {qkv: getattr(m, attr) for m, qkv, attr in _attention_layers(model)}}


def _heads_after(model: nn.Module, pruner) -> None:
    """The head count and width the forward reads, from what step() left (its timm ViT example)."""
    for m, qkv, attr in _attention_layers(model):
        heads = pruner.num_heads.get(qkv, getattr(m, attr))
        setattr(m, attr, heads)
        if hasattr(m, "head_dim"):
            m.head_dim = qkv.out_features // (3 * heads)
        if hasattr(m, "output_dim"):  # MViT reshapes the heads' output to output_dim
            m.output_dim = heads * m.head_dim


def torchvision_setup(model: nn.Module, global_pruning: bool = True) -> PrunerSetup:
    """Torch-Pruning's own recipe for a torchvision model (module docstring); the plain call otherwise."""
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        VisionTransformer = ()
    if isinstance(model, VisionTransformer):
        return PrunerSetup(global_pruning, _vit_options, _vit_after, "ViT: round_to=num_heads, hidden_dim reset")
    if _attention_layers(model):
        return PrunerSetup(global_pruning, _heads_options, _heads_after,
                           "num_heads={q/k/v Linear: heads}, head attributes reset")
    return PrunerSetup(global_pruning)


@dataclass
class PeerResult:
    """A Torch-Pruning model at a MACs target, or why there is none."""

    model: nn.Module | None
    macs: int = 0
    macs_fraction: float = 1.0
    ratio: float | None = None  # the pruning_ratio found
    seconds: dict = field(default_factory=dict)  # dependency_graph, step, total of the kept try
    tries: list = field(default_factory=list)  # [(ratio, macs_fraction), ...] of the search
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.model is not None


def _fresh_copy(model: nn.Module, ignored: list) -> tuple[nn.Module, list]:
    """A deep copy to prune in place, and the ignored layers' counterparts in it."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(True)  # its tracer follows autograd (README: frozen params prune nothing)
    mapping = dict(zip(model.modules(), work.modules()))
    return work, [mapping[m] for m in ignored]


def _prune_in_place(work: nn.Module, inputs: ExampleInputs, ratio: float, round_to: int | None,
                    ignored: list, setup: PrunerSetup | None = None) -> dict:
    import torch_pruning as tp

    setup = setup or PrunerSetup()
    example = inputs.args[0] if len(inputs.args) == 1 and not inputs.kwargs else (
        dict(inputs.kwargs) if inputs.kwargs else list(inputs.args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        options = {"round_to": round_to, **(setup.options(work) if setup.options else {})}
        pruner = tp.pruner.BasePruner(work, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      global_pruning=setup.global_pruning, pruning_ratio=ratio, iterative_steps=1,
                                      ignored_layers=ignored, **options)
        t1 = time.perf_counter()
        pruner.step()
        if setup.after_step is not None:
            setup.after_step(work, pruner)
        t2 = time.perf_counter()
    for p in work.parameters():
        p.requires_grad_(False)
    return {"dependency_graph": t1 - t0, "step": t2 - t1, "total": t2 - t0}


def prune_once(model: nn.Module, inputs: ExampleInputs, ratio: float, round_to: int | None = None,
               ignored: list | None = None, setup: PrunerSetup | None = None) -> tuple[nn.Module, dict]:
    """A deep copy of `model` pruned by Torch-Pruning at `ratio`; seconds of graph build and step."""
    ignored = ignored if ignored is not None else classifier_layers(model, inputs)
    work, ignored_copy = _fresh_copy(model, ignored)
    return work, _prune_in_place(work, inputs, ratio, round_to, ignored_copy, setup)


def prune_to_macs(model: nn.Module, example_inputs: Any, target: float, round_to: int | None = None, *,
                  macs_before: int | None = None, tolerance: float = 0.005, max_tries: int = 10,
                  first_guess: float | None = None, over: float = 0.0,
                  setup: PrunerSetup | None = None) -> PeerResult:
    """Search `pruning_ratio` for the largest MACs fraction <= `target` (within `tolerance` of it).

    Regula falsi on log(MACs fraction) against log(1 - ratio) (MACs fall roughly with the square
    of the kept width), bracketed, with bisection when it stalls; at most `max_tries` prunings.
    With `over` > 0 a band around the target is accepted instead, [target - tolerance, target + over],
    and the try closest to the target among those at most target + over is kept. `setup`: how
    Torch-Pruning is called (`PrunerSetup`; the module's defaults without it).
    """
    inputs = ExampleInputs.normalize(example_inputs)
    macs_before = macs_before or count_macs(model, inputs)
    try:
        ignored = classifier_layers(model, inputs)
        reference = output_shapes(model, inputs)
    except Exception as exc:  # noqa: BLE001 - the model itself does not run: nothing to compare
        return PeerResult(None, error=f"{type(exc).__name__}: {exc}")
    search = _RatioSearch(target)
    best, tries = None, []
    guess = first_guess if first_guess is not None else search.guess()
    for _ in range(max_tries):
        try:
            pruned, seconds = prune_once(model, inputs, guess, round_to, ignored, setup)
            frac = count_macs(pruned, inputs) / macs_before
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's own failure is the result
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return PeerResult(None, tries=tries, error=f"{type(exc).__name__}: {first}"[:300])
        tries.append((round(guess, 5), round(frac, 5)))
        search.add(guess, frac)
        if frac <= target + over and (best is None or abs(frac - target) < abs(best[2] - target)):
            best = (pruned, seconds, frac, guess)
        if target - tolerance <= frac <= target + over:
            break
        guess = search.guess()
        if guess is None:
            break
    if best is None:
        return PeerResult(None, tries=tries, error=f"no pruning_ratio reached {target + over:g} of the MACs in "
                                                   f"{len(tries)} tries (last: {tries[-1] if tries else None})")
    pruned, seconds, frac, ratio = best
    shapes = output_shapes(pruned, inputs)
    if shapes != reference:
        return PeerResult(None, tries=tries, error=f"output shapes changed: {reference} -> {shapes}")
    return PeerResult(pruned, int(round(frac * macs_before)), frac, ratio, seconds, tries)


class _RatioSearch:
    """Illinois regula falsi for the ratio whose MACs fraction is the target, in coordinates where
    the relation is nearly linear: x = log(1 - ratio), y = log(fraction / target)."""

    def __init__(self, target: float):
        self.target = target
        self.lo = (0.0, 0.0, -math.log(target))  # (ratio, x, y): above the target (y > 0)
        self.hi = None  # at or below it (y <= 0)
        self.side = 0  # which end moved last (+1 lo, -1 hi), for the Illinois halving

    def add(self, ratio: float, frac: float) -> None:
        point = (ratio, math.log(max(1 - ratio, 1e-9)), math.log(max(frac, 1e-12) / self.target))
        if point[2] > 0:
            if ratio >= self.lo[0]:
                if self.side == 1 and self.hi is not None:
                    self.hi = (*self.hi[:2], self.hi[2] / 2)
                self.lo, self.side = point, 1
        elif self.hi is None or ratio <= self.hi[0]:
            if self.side == -1:
                self.lo = (*self.lo[:2], self.lo[2] / 2)
            self.hi, self.side = point, -1

    def guess(self) -> float | None:
        r0, x0, y0 = self.lo
        if self.hi is None:  # MACs ~ (1 - ratio)^p: fit p on the last point, overshoot a little
            p = 2.0 if r0 == 0 else max((y0 + math.log(self.target)) / x0, 0.5)
            r = 1 - self.target ** (1 / p)
            return min(r0 + 1.15 * (r - r0), 0.995) if r0 < 0.995 else None
        r1, x1, y1 = self.hi
        if r1 - r0 < 1e-4:
            return None
        x = x0 - y0 * (x1 - x0) / (y1 - y0) if y1 != y0 else (x0 + x1) / 2
        r = 1 - math.exp(x)
        return r if r0 < r < r1 else (r0 + r1) / 2


def time_prune(model: nn.Module, example_inputs: Any, ratio: float, round_to: int | None, repeats: int) -> dict:
    """Median seconds of `repeats` prunings at `ratio` (graph build, step, total) and the peak memory of
    one. The deep copy each try prunes is made before the clock and the memory count start; its time
    is reported apart (``deepcopy``): Torch-Pruning prunes in place, so keeping the original costs
    that copy, which fxprune's rewrite includes."""
    inputs = ExampleInputs.normalize(example_inputs)
    ignored = classifier_layers(model, inputs)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work, ignored_copy = _fresh_copy(model, ignored)
        copy_s = time.perf_counter() - t0
        runs.append({**_prune_in_place(work, inputs, ratio, round_to, ignored_copy), "deepcopy": copy_s})
        del work
    work, ignored_copy = _fresh_copy(model, ignored)
    with PeakMemory() as peak:
        _prune_in_place(work, inputs, ratio, round_to, ignored_copy)
    del work
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {**med, "peak_mib": peak.mib, "peak_method": peak.method, "repeats": repeats}


__all__ = ["PeerResult", "PrunerSetup", "classifier_layers", "prune_once", "prune_to_macs", "time_prune",
           "torch_pruning_status", "torchvision_setup"]
