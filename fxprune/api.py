"""The public entry points: `analyze`, `prune_with_plan` and `compress`.

`compress` is the one driver of every method (`fxprune.methods`): it checks the arguments and the
constraints against what the method supports, analyses the model, runs the method once on the
read-only analysis, applies the returned plan (with the method's new weights, if it trained) and
verifies the slim model against the masked original.

Example::

    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18(weights=None).eval()
    >>> slim = fxprune.compress(model, method="l1", example_inputs=torch.randn(1, 3, 224, 224), flops=0.5)
    >>> slim.fxprune_report.macs_ratio <= 0.5
    True
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from fxprune.passes.mask import masked_reference
from fxprune.passes.module_copy import copy_sharing
from fxprune.passes.plan import PruningPlan, ResolvedPlan, resolve
from fxprune.passes.rewrite import apply_plan
from fxprune.passes.tensors import set_tensor

from . import report as _report
from .analysis import ModelAnalysis, analyze, with_grouped
from .arguments import grouped_option, heads_option, layernorm_option
from .constraints import Constraints, MeasureOn
from .errors import ConfigError, NothingToPruneError
from .hooks import carry_root_hooks, preserve_through_deepcopy
from .methods import METHODS, MethodContext, get_method, make_options
from .models import model_source
from .recipe import make_recipe
from .tensor_cores import warn_if_misaligned
from .verify import sensitive_values
from .verify import verify as verify_against

DATA_FREE_METHODS = tuple(name for name, m in METHODS.items() if not m.needs_data)


def all_methods() -> tuple[str, ...]:
    """Every registered method (`fxprune.methods.register_method`), data-free ones first."""
    return tuple(METHODS)


def _check_options(method: str, flops: float, round_to, min_channels, min_ratio) -> None:
    """The CLI's early check: a known method and valid constraints."""
    get_method(method)
    Constraints(flops=flops, round_to=round_to, min_channels=min_channels, min_ratio=min_ratio)


def with_weights(analysis: ModelAnalysis, weights: dict) -> ModelAnalysis:
    """The analysis of a copy of the analysed model holding `weights` (a method's trained values)."""
    gm = copy.deepcopy(analysis.traced.graph_module)
    gm.load_state_dict(weights, strict=True)
    return dataclasses.replace(analysis, traced=dataclasses.replace(analysis.traced, graph_module=gm),
                               channels=dataclasses.replace(analysis.channels, gm=gm))


def _verified_pair(analysis: ModelAnalysis, resolved: ResolvedPlan, slim: fx.GraphModule):
    """(masked reference, slim model to compare, names given random values) for the verification.

    Where the analysed model has zero or tiny scales (`verify.sensitive_values`), both are built from
    a copy holding random normal-size values instead (the same plan, the same rewrite), so that
    residual branches starting at zero still reach the output; the model that is returned keeps
    its own values and the user's model is never written to."""
    gm = analysis.traced.graph_module
    fresh = sensitive_values(gm)
    if not fresh:
        return carry_root_hooks(gm, masked_reference(analysis.channels, resolved)), slim, []
    shared = [n for n, _ in [*gm.named_parameters(), *gm.named_buffers()] if n not in fresh]
    copy_gm = copy_sharing(gm, shared)  # only the replaced tensors are new
    for name, value in fresh.items():
        set_tensor(copy_gm, name, value)
    channels = dataclasses.replace(analysis.channels, gm=copy_gm)
    checked = apply_plan(channels, resolved)
    checked.training = gm.training
    carry_root_hooks(gm, checked)
    return carry_root_hooks(gm, masked_reference(channels, resolved)), checked, sorted(fresh)


def _sensitivity_note(names: list[str]) -> str:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (f"verified on a copy in which {len(names)} zero or tiny (|x| < 1e-3) scale/weight tensors got "
            f"random normal-size values ({shown}); the returned model keeps its own values")


def prune_with_plan(analysis: ModelAnalysis, plan: PruningPlan | ResolvedPlan, *, verify_output: bool = True,
                    tolerance: float | None = None) -> tuple[fx.GraphModule, Any]:
    """Rewrite with `plan` and (optionally) verify against the masked original."""
    resolved = resolve(analysis.channels, plan)
    slim = apply_plan(analysis.channels, resolved)
    slim.training = analysis.traced.graph_module.training
    carry_root_hooks(analysis.traced.graph_module, slim)
    preserve_through_deepcopy(slim, fxprune_recipe=make_recipe(analysis, resolved.plan))
    result = None
    if verify_output:
        reference, checked, _ = _verified_pair(analysis, resolved, slim)
        result = verify_against(reference, checked, analysis.inputs, tolerance)
    return slim, result


def compress(model: nn.Module, method: str = "l1", example_inputs: Any = None, flops: float = 0.5, *,
             round_to: int | None = None, ignore: Iterable = (), leaf_modules: Iterable = (),
             concrete_args: dict | None = None, min_channels: int = 1, min_ratio: float = 0.0,
             verify: bool = True, tolerance: float | None = None, seed: int = 0,
             data: Any = None, options: dict | None = None, latency: float | None = None,
             latency_ms: float | None = None, params: float | None = None, device: str = "cpu",
             batch: int | None = None, dtype: Any = None, channels_last: bool = False,
             compile: bool | str = False, grouped: str = "whole", heads: str = "whole",
             layernorm: str = "boundary", blocks: bool = False) -> fx.GraphModule:
    """Return a slim copy of `model` keeping at most `flops` of its FLOPs.

    Args:
        method: a registered method's name (``fxprune.methods.METHODS``): ``l1``, ``l2``, ``bn_scale``,
            ``random``, ``uniform`` (data-free), ``gate_decorator``, ``gal``, ``metapruning`` (need data).
        example_inputs: a tensor, tuple of positional args or dict of keyword args.
        flops: fraction of the original FLOPs (= MACs) the result may keep, in (0, 1].
        round_to: keep channel counts multiples of this (per group, e.g. 8 for tensor cores), or
            ``"auto"``: on the latency model's step edges. A model on a GPU (parameters on CUDA, or
            ``device="cuda"``) cut to counts that are not multiples of 8 with round_to None gets a
            `fxprune.tensor_cores.TensorCoreWarning` (such layers can run slower than the original's).
        ignore: modules (qualified names, globs, types or instances) whose channels must stay.
        leaf_modules: module types or names to trace as opaque leaves (their channels stay).
        concrete_args: fixed values for non-tensor forward arguments (passed to torch.fx).
        min_channels / min_ratio: each group keeps at least this many / this fraction of channels.
        verify: compare with the masked original on random inputs and raise if they differ.
        tolerance: relative tolerance of the verification (default by dtype: 1e-4 for fp32).
        data: training batches for data-driven methods (``gate_decorator``): (inputs, targets) pairs,
            or bare inputs, which the original model then labels.
        latency: a latency limit as a fraction of the original model's measured latency, in (0, 1], for
            methods that support one; the FLOPs target applies as well (pass ``flops=1.0`` for latency only).
        latency_ms: the latency limit in milliseconds instead.
        blocks: with a latency target, the selection may also remove whole residual blocks (the
            branch of a residual add goes, its shortcut stays) where that keeps more importance per
            second saved than narrowing channels: a block's kernels go with it, which on a GPU whose
            forward is bound by kernel launches (or at batch 1) is the only way to be much faster.
            Methods ``l1``, ``l2``, ``bn_scale``, ``random``. Not function-preserving (like any cut):
            the result is verified against the masked original with those branches zeroed.
        device / batch / dtype / channels_last / compile: where and how latency is measured (the device
            the model will run on; batch None = the example inputs'; dtype None = the model's; compile
            True or a torch.compile mode: ``"reduce-overhead"`` measures with CUDA graphs, as GPU models
            that are bound by kernel launches ship; ``"cuda-graph"``: the eager forward captured in one
            CUDA graph and replayed, no compilation; CUDA only).
        params: fraction of the original parameters the result may keep, for methods that support it.
        grouped: how grouped convs are pruned: ``"whole"`` groups go (the default), ``"equal"``: every
            group keeps the same channel positions (its group count stays), ``"auto"``: equal where the
            groups are wide enough (per-group width >= number of groups), whole elsewhere. Depthwise
            convs always lose whole groups. The recipe records the option (as it does `heads` and
            `layernorm`), so `fxprune.save` / `fxprune.load` replay an equal/auto result.
        heads: how attention heads (nn.MultiheadAttention and so torchvision's ViT, Swin's (2D and
            video), MaxViT's and MViT's attention) are pruned: ``"whole"`` heads go (the default), ``"width"``:
            every head stays and keeps the same q/k positions (fewer terms in its q k^T, scaled as
            before) and the same v positions (narrower outputs), ``"auto"``: width where a head is at
            least as wide as the number of heads, whole elsewhere. MViT's attention is narrowed only
            with ``layernorm="prune"`` (its pooling LayerNorms normalise over the head width); else
            it loses whole heads.
        layernorm: ``"boundary"`` (the default): a LayerNorm (or F.layer_norm, or a channels-first
            LayerNorm2d) over the channel dim keeps its channels, so transformers keep their residual
            stream width. ``"prune"``: the stream is pruned through it, as Torch-Pruning does: the slim
            LayerNorm has the kept channels' weight, bias and normalized_shape and computes its
            statistics over the kept channels only. **This is not function-preserving** with respect to
            the original model (a removed channel with nonzero values changed the mean and variance of
            every other): the verification compares with a masked reference whose LayerNorms normalise
            over the kept channels only (`fxprune.passes.mask`), which the slim model equals; plan to
            fine-tune. nn.MultiheadAttention then loses stream width too; a ViT's class token and
            positional embedding are sliced with it.
        options: method options, a dict or the method's options object (``fxprune.methods``:
            ``GateDecoratorOptions``, ``GALOptions``, ``MetaPruningOptions``).

    A constraint (`round_to`, `latency`, ...) the chosen method does not honour is a ConfigError.

    The returned GraphModule has the model's dtype, device and train/eval mode; its
    ``fxprune_report`` attribute holds the before/after numbers. The input model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = get_method(method)
    constraints = Constraints(flops=flops, params=params, latency=latency, latency_ms=latency_ms, round_to=round_to,
                              min_channels=min_channels, min_ratio=min_ratio, blocks=blocks)
    measure_on = MeasureOn(device=device, batch=batch, dtype=dtype, channels_last=channels_last, compile=compile)
    constraints.require_supported(chosen.name, chosen.supports)
    opts = make_options(chosen, options, seed)
    grouped, heads, layernorm = grouped_option(grouped), heads_option(heads), layernorm_option(layernorm)
    t0 = time.perf_counter()
    analysis = analyze(model, example_inputs, ignore=ignore, leaf_modules=leaf_modules, concrete_args=concrete_args)
    analysis = with_grouped(analysis, grouped, heads, layernorm)
    if not analysis.channels.prunable_groups:
        reason = _report.main_boundary_reason(analysis.channels)
        raise NothingToPruneError(
            f"{type(model).__name__} has no prunable channel group ({len(analysis.groups)} groups, all fixed; "
            f"main reason: {reason or 'no conv/linear layers found'}). Check ignore= and leaf_modules=, "
            "or run fxprune.analyze(model, x) to see every boundary.")
    t1 = time.perf_counter()
    outcome = chosen.run(MethodContext(analysis, constraints, opts, data, original=model, seed=seed,
                                       measure_on=measure_on))
    plan, details = outcome.plan, outcome.details
    if outcome.weights is not None:
        analysis = with_weights(analysis, outcome.weights)
        analysis.source = model_source(model) or analysis.source
    t2 = time.perf_counter()
    misaligned = warn_if_misaligned(model, device, round_to, analysis.channels, plan, chosen.name,
                                    rounds="round_to" in chosen.supports)
    if misaligned:
        details = {**(details or {}), "tensor_cores": misaligned}
    resolved = resolve(analysis.channels, plan)  # once: rewrite, reference, cost and recipe share it
    slim, result = prune_with_plan(analysis, resolved, verify_output=False)
    t3 = time.perf_counter()
    if verify:
        reference, checked, randomized = _verified_pair(analysis, resolved, slim)
        result = verify_against(reference, checked, analysis.inputs, tolerance)
        if randomized:
            details = {**(details or {}), "verification": _sensitivity_note(randomized)}
    t4 = time.perf_counter()
    report = _report.CompressionReport(
        model=type(model).__name__, method=method, target_flops=flops,
        params_before=int(analysis.cost.total_params), params_after=sum(p.numel() for p in slim.parameters()),
        macs_before=int(analysis.cost.total_macs), macs_after=int(round(analysis.cost.macs(resolved.keep_roots, resolved.removed_nodes))),
        max_abs_error=None if result is None else result.max_abs_error,
        max_rel_error=None if result is None else result.max_rel_error,
        groups=len(analysis.groups), prunable_groups=len(analysis.channels.prunable_groups),
        boundaries=list(analysis.boundaries),
        timings={**analysis.timings, "method": t2 - t1, "rewrite": t3 - t2, "verify": t4 - t3, "total": t4 - t0},
        details=details,
    )
    return preserve_through_deepcopy(slim, fxprune_report=report)

