"""GAL (Lin et al., CVPR 2019): label-free pruning of channels, branches and blocks at once.

The *generator* is the model with soft masks inserted as graph nodes (`passes.gal_masks`); the
*baseline* is a frozen copy of the original; a *discriminator* (`fxprune.discriminator`) tells
their outputs apart. Per mini-batch (authors' `main.py`):

1. discriminator step: BCE(D(baseline), 1) + BCE(D(generator), 0) + BCE(D(generator), 1), the last
   term being the adversarial regulariser that stops D from dominating (`d_regularizer`);
2. generator step (SGD, masks excluded): mu * MSE(baseline, generator) + BCE(D(generator), 1)
   (+ lam * ||m||_1 as a sub-gradient into the masks' gradient, `l1_in_gradient`) + weight decay;
3. every `mask_step` iterations, a FISTA step on the masks (`fxprune.fista`): soft-threshold to
   exact zeros, clamp at 0.
All three learning rates decay by `lr_gamma` at the `lr_milestones` (fractions of the run; the
authors' 30/60/90 of 100 epochs). Labels are never used for training (only the optional
fine-tune uses them, when the batches carry them).

Removal (`passes.gal_plan`): masks at exactly zero remove their channels, concat inputs (with
the whole producing branch) and residual blocks; the rest is folded into the adjacent BN or layer.

FLOPs: `lam` sets the sparsity. With ``flops < 1`` (compress's target) GAL also steers: while the
exactly counted MACs of the structure without the masks already below `steer_threshold` (on
their way out: counting only exact zeros would let lam grow until every mask collapses at once)
lag a linear path to the target (reached at `target_at` of the run), lam grows by `lam_growth`
per FISTA step; the step that crosses the target
revives the newly zeroed masks with the largest previous values while the MACs stay at or under
the target, and from then on the masks are frozen (the rest of the run trains the weights). If the
run ends above the target, the smallest masks are zeroed (binary search on exact MACs).
``flops_weighted=p`` (ours, 0 = off by default) weighs each mask's L1 term by (the MACs it saves /
their mean) ** p, so cheap structures (a LeNet fc1 neuron: 0.8K MACs) are not pruned as eagerly
as expensive ones (a conv1 filter: 94K) when the goal is FLOPs rather than parameters; p = 1 is
the linear cost weighting, p = 0.5 a softer one.

Deliberate differences from the authors' code (each one an option):
* the baseline runs in eval mode (theirs stays in train mode, so its BN statistics drift):
  ``teacher_mode="train"`` restores that;
* masks start at 1, so the generator starts equal to the baseline (theirs: N(0,1), half of them
  negative until the first FISTA step): ``mask_init="normal"``;
* the discriminator is an MLP with ReLUs returning a logit (theirs: affine + a doubled sigmoid):
  ``discriminator="authors"``;
* the result is the final state, never a checkpoint picked by test accuracy (their model_best).

Under torch.distributed (``torchrun``; the script calls `fxprune.train.init_distributed()` and
passes a DataLoader with a DistributedSampler): every rank starts from rank 0's seed, masked model,
baseline and discriminator; after each backward the discriminator's and the generator's gradients
are averaged over the ranks (one flattened all-reduce each, the loss values riding along, so a
non-finite loss on any rank stops every rank), and the masks' gradients at each FISTA step. The
updates, FISTA steps, lam steering, freezing, revival and the final thresholding are then
bit-identical on every rank: each rank's batch is a part of one larger batch. The logged losses
(``details["epochs"]``) are those averages over the ranks; the BN running statistics folded and
kept are rank 0's; a latency fit measures on rank 0 and every rank uses its seconds.

Example::

    >>> slim = fxprune.compress(model, "gal", x, flops=0.25, data=loader,
    ...                         options={"structures": ("channel",), "epochs": 3, "mask_step": 20})
    >>> slim.fxprune_report.details["removed_blocks"]
"""
from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.analysis import ModelAnalysis
from fxprune.constraints import Constraints
from fxprune.distributed import (
    average_across_ranks,
    average_gradients,
    sync_from_rank0,
    with_rank0_seed,
)
from fxprune.errors import ConfigError, LatencyUnreachableError, TargetUnreachableError
from fxprune.latency_model import profile_latency
from fxprune.passes.fuse_masked_conv import fuse_masked_convs
from fxprune.passes.gal_masks import (
    INITS,
    STRUCTURES,
    SoftMaskedModel,
    insert_soft_masks,
)
from fxprune.passes.gal_plan import fold_masks, mask_costs, mask_state, state_macs
from fxprune.passes.plan import PruningPlan, plan_removed_nodes
from fxprune.train import TrainingError, _bar, _batches
from fxprune.verify import eval_mode

from ..base import MethodContext, MethodResult
from ..latency_selection import GROW_ROUNDS, fit_measured, predict_kept
from .. import fused_kernels
from ..latency_target import latency_details, slim_latency
from .discriminator import DISCRIMINATORS, make_discriminator, output_features
from .fista import FISTA


@dataclass
class GALOptions:
    structures: tuple = STRUCTURES  # any subset of ("channel", "branch", "block")
    epochs: int = 100
    lr: float = 0.01  # generator and discriminator SGD
    momentum: float = 0.9
    weight_decay: float = 2e-4
    lr_milestones: tuple = (0.3, 0.6, 0.9)  # fractions of the run (authors: epochs 30, 60, 90 of 100)
    lr_gamma: float = 0.1
    mu: float = 1.0  # weight of MSE(baseline, generator); authors: 1 for ResNet, 0.1 for VGG/GoogLeNet
    lam: float = 0.6  # L1 weight on the masks (authors' --lambda; ResNet-56: 0.6)
    adversarial_weight: float = 1.0
    mask_step: int = 200  # iterations between FISTA steps
    mask_lr: float | None = None  # FISTA step size (default: lr, decayed with it)
    l1_in_gradient: bool = True  # authors apply L1 twice: as a sub-gradient and through the prox
    mask_gradient: str = "batch"  # "batch": the last batch's gradient (authors); "mean": since last step
    fista_restart: bool = False  # reset FISTA momentum at every LR decay (authors: never)
    mask_init: str = "ones"
    discriminator: str = "mlp"
    d_regularizer: bool = True
    teacher_mode: str = "eval"
    # generator through compact regions / torch.ops.fxprune.masked_conv2d (soft, hard once frozen);
    # "auto": on a CPU without module hooks (`fxprune.methods.fused_kernels`)
    fused_kernels: bool | str = "auto"
    flops_weighted: float = 0.0  # L1 weight of a mask entry = (MACs it saves / their mean) ** this; 0: all 1
    lam_growth: float = 1.25  # lam multiplier per FISTA step while behind the FLOPs path
    target_at: float = 0.5  # fraction of the run by which the FLOPs target should be met
    steer_threshold: float = 0.1  # steering counts masks below this as on their way out (see docstring)
    finetune_epochs: int = 0  # after GAL, masks frozen: CE on labels if batches have them, else MSE
    finetune_lr: float = 1e-3
    max_steps_per_epoch: int | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        self.structures = tuple(self.structures)
        bad = [s for s in self.structures if s not in STRUCTURES]
        if bad or not self.structures:
            raise ConfigError(f"GAL structures={self.structures!r}: choose a non-empty subset of {STRUCTURES}")
        for name, value, choices in (("mask_init", self.mask_init, INITS),
                                     ("discriminator", self.discriminator, DISCRIMINATORS),
                                     ("mask_gradient", self.mask_gradient, ("batch", "mean")),
                                     ("teacher_mode", self.teacher_mode, ("eval", "train"))):
            if value not in choices:
                raise ConfigError(f"GAL {name}={value!r}: choose one of {', '.join(choices)}")
        fused_kernels.check(self.fused_kernels, "gal")
        if isinstance(self.flops_weighted, bool):
            self.flops_weighted = float(self.flops_weighted)
        if self.flops_weighted < 0:
            raise ConfigError(f"GAL flops_weighted={self.flops_weighted}: an exponent >= 0 (0 = plain L1)")
        if self.epochs < 1 or self.mask_step < 1 or self.lr <= 0 or self.lam < 0 or self.lam_growth < 1:
            raise ConfigError("GAL needs epochs >= 1, mask_step >= 1, lr > 0, lam >= 0 and lam_growth >= 1")


def _split(batch):
    """(inputs as call args, targets or None) from a batch: (inputs, targets) or bare inputs."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[1]):
        inputs, targets = batch
    else:
        inputs, targets = (batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 1 else batch), None
    return inputs, targets


def _call(model, inputs, device):
    if isinstance(inputs, dict):
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return model(*[v.to(device) if torch.is_tensor(v) else v for v in inputs])
    return model(inputs.to(device))


def _mse(a, b) -> torch.Tensor:
    return F.mse_loss(output_features_full(a), output_features_full(b))


def output_features_full(out) -> torch.Tensor:
    """Every output element, flattened per sample (the data loss compares all of them)."""
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    if isinstance(out, (tuple, list)):
        return torch.cat([output_features_full(o) for o in out], dim=1)
    return out.reshape(out.shape[0], -1)


@dataclass
class _Run:
    """The state one GAL run carries between iterations."""

    masked: SoftMaskedModel
    teacher: nn.Module
    disc: nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    fista: FISTA | None
    lam: float
    budget: float | None
    l1_weights: list | None = None  # per mask parameter (flops_weighted), else None = all 1
    fused: bool = False
    forward: nn.Module | None = None  # what runs the generator: masked.module or its fused copy
    frozen: bool = False
    since_step: int = 0
    history: list = field(default_factory=list)
    last: list | None = None  # per mask entry, its last nonzero value before a FISTA step (revival)


def _bce(logits, value: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, value))


def _lr_factor(opts: GALOptions, progress: float) -> float:
    return opts.lr_gamma ** sum(progress >= m for m in opts.lr_milestones)


def _synced(params, losses: torch.Tensor) -> torch.Tensor:
    """Average the gradients of `params` and the (detached) `losses` over the ranks, in one
    all-reduce; returns the averaged losses (no-op without distributed). Every rank then steps
    with the same gradients (bit-identical updates) and judges the same loss values."""
    losses = losses.detach().clone()
    average_across_ranks([*(p.grad for p in params), losses])
    return losses


def _check_finite(losses: torch.Tensor, what: str) -> None:
    """Refuse non-finite losses (rank-averaged ones: a NaN on any rank makes every rank raise,
    so none is left waiting in the next all-reduce)."""
    if not torch.isfinite(losses).all():
        raise TrainingError(f"GAL {what} loss became non-finite ({losses.tolist()}): lower lr / mu or check the data")


def _iteration(run: _Run, opts: GALOptions, inputs, targets, device, adversarial: bool, loss_kind: str):
    """One discriminator step (when `adversarial`) and one generator step; returns the losses
    (discriminator, generator, data), averaged over the ranks under distributed. The masks'
    gradients are averaged at the FISTA step (`_mask_step`), the only place they are used."""
    with torch.no_grad():
        t = _call(run.teacher, inputs, device)
    s = _call(run.forward, inputs, device)
    loss_d = torch.zeros(())
    if adversarial:
        ft, fs = output_features(t), output_features(s)
        d_s = run.disc(fs.detach())
        loss_d = _bce(run.disc(ft), 1.0) + _bce(d_s, 0.0) + (_bce(d_s, 1.0) if opts.d_regularizer else 0.0)
        run.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        loss_d = _synced(run.disc.parameters(), loss_d.reshape(1))
        _check_finite(loss_d, "discriminator")
        run.opt_d.step()
    if loss_kind == "ce":
        data_loss = F.cross_entropy(s, targets.to(device))
    else:
        data_loss = opts.mu * _mse(t, s)
    loss_g = data_loss
    if adversarial:
        loss_g = loss_g + opts.adversarial_weight * _bce(run.disc(output_features(s)), 1.0)
    masks = run.masked.params()
    if not run.frozen and opts.l1_in_gradient and run.lam:
        weights = run.l1_weights or [1.0] * len(masks)
        loss_g = loss_g + run.lam * sum((w * m.abs()).sum() for m, w in zip(masks, weights))
    run.opt_g.zero_grad(set_to_none=True)
    if run.frozen or opts.mask_gradient == "batch":
        for m in masks:
            m.grad = None
    loss_g.backward()
    generator = [p for group in run.opt_g.param_groups for p in group["params"]]
    losses = _synced(generator, torch.stack([loss_g.detach(), data_loss.detach().to(loss_g)]))
    _check_finite(losses, "generator (total, data)")
    run.opt_g.step()
    return float(loss_d.reshape(())), float(losses[0]), float(losses[1])


def _entries(masked: SoftMaskedModel, where) -> list[tuple[float, int, int]]:
    """(value, param index, flat index) of the mask entries selected by `where(param) -> bool array`."""
    return [(float(p.detach().reshape(-1)[j]), i, int(j)) for i, p in enumerate(masked.params())
            for j in np.nonzero(where(i, p.detach().reshape(-1)).cpu().numpy())[0]]


def _largest_fitting(analysis, cost, masked: SoftMaskedModel, base: list[torch.Tensor], entries, fill,
                     budget: float, more_is_cheaper: bool, value=None) -> int:
    """Set the masks to `base`, then `fill(k)` values into the first k `entries`; binary search the
    k that keeps the most (fewest zeroed / most revived) with `value(mask state)` (default: exact
    MACs) at or under `budget`."""
    params = masked.params()
    value = value or (lambda state: state_macs(cost, state))

    def macs(k: int) -> float:
        with torch.no_grad():
            for p, b in zip(params, base):
                p.copy_(b)
            for v, i, j in entries[:k]:
                params[i].view(-1)[j] = fill(v)
        return value(mask_state(analysis, masked))

    lo, hi = 0, len(entries)
    while lo < hi:  # more_is_cheaper: smallest k under budget; else: largest k under budget
        mid = (lo + hi) // 2 if more_is_cheaper else (lo + hi + 1) // 2
        fits = macs(mid) <= budget
        if more_is_cheaper:
            lo, hi = (lo, mid) if fits else (mid + 1, hi)
        else:
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
    macs(lo)
    return lo


def _revive(analysis, cost, masked: SoftMaskedModel, before: list[torch.Tensor], budget: float,
            last: list[torch.Tensor] | None = None) -> None:
    """After a step that crossed the budget: give back zeroed masks while the exact MACs stay at or
    under the budget, so the structure lands on the target (the rule of Gate Decorator's last Tick):
    first the newly zeroed ones with the largest previous values (binary search on the prefix),
    then, one by one, every entry that still fits, newly zeroed before older ones (`last`: each
    entry's last nonzero value, its revived value)."""
    newly = _entries(masked, lambda i, p: (p == 0) & (before[i].reshape(-1) != 0))
    newly = sorted(((float(before[i].reshape(-1)[j]), i, j) for _, i, j in newly), reverse=True)
    after = [p.detach().clone() for p in masked.params()]
    k = _largest_fitting(analysis, cost, masked, after, newly, lambda v: v, budget, more_is_cheaper=False)
    older = []
    if last is not None:
        older = _entries(masked, lambda i, p: (p == 0) & (before[i].reshape(-1) == 0) & (last[i].reshape(-1) != 0))
        older = sorted(((float(last[i].reshape(-1)[j]), i, j) for _, i, j in older), reverse=True)
    _fill(analysis, cost, masked, newly[k + 1:] + older, budget)  # newly[k] did not fit
    _swap_into_band(analysis, cost, masked, newly + older, budget)


def _fill(analysis, cost, masked: SoftMaskedModel, entries, budget: float) -> None:
    """Give each zeroed entry (value, param, index) its value back, in order, if the exact MACs stay
    at or under the budget: what a prefix search leaves when one big entry does not fit."""
    params = masked.params()
    for v, i, j in entries:
        with torch.no_grad():
            params[i].view(-1)[j] = v
            if state_macs(cost, mask_state(analysis, masked)) > budget:
                params[i].view(-1)[j] = 0.0


def _threshold_to(analysis, cost, masked: SoftMaskedModel, budget: float, flops: float) -> None:
    """Zero the smallest masks (one entry at a time, ties in mask order) until the exact MACs are at
    or under `budget`, then give back, largest first, the zeroed ones that still fit (`_fill`)."""
    alive = sorted(_entries(masked, lambda i, p: p != 0), key=lambda e: abs(e[0]))
    current = [p.detach().clone() for p in masked.params()]
    k = _largest_fitting(analysis, cost, masked, current, alive, lambda v: 0.0, budget, more_is_cheaper=True)
    if k == len(alive) and state_macs(cost, mask_state(analysis, masked)) > budget:
        minimum = state_macs(cost, mask_state(analysis, masked))
        raise TargetUnreachableError(flops, minimum / cost.total_macs, " (every GAL mask at zero)")
    _fill(analysis, cost, masked, alive[:max(k - 1, 0)][::-1], budget)  # alive[k - 1] made it fit
    _swap_into_band(analysis, cost, masked, alive[:k], budget)


BAND = 0.01  # compared methods land within 1 % of the target MACs (the evidence runner's equal budgets)
SWAP_REVIVE, SWAP_ZERO = 16, 32  # a swap's candidates: the largest zeroed values, the smallest live ones


def _swap_into_band(analysis, cost, masked: SoftMaskedModel, revivable, budget: float) -> None:
    """When the fills leave the exact MACs more than `BAND` under the budget: one swap, giving back
    a zeroed entry of `revivable` ((value, param, index), largest |value| first) and zeroing a live
    one (smallest |value| first), the first pair whose MACs land in [budget x (1 - BAND), budget].

    Why: a unit of a coupled residual stream can cost more than the slack the fills leave, so no
    single entry fits (ResNet-20 at 5 % of the MACs landed 1.7 % under in 1 of 5 seeds), while
    methods are compared at equal MACs. Gate Decorator's `_fill_slack` needs no swap: it only
    gives back. Nothing changes when no pair lands; at most SWAP_REVIVE x SWAP_ZERO MACs counts."""
    params = masked.params()

    def macs() -> float:
        return state_macs(cost, mask_state(analysis, masked))

    low = budget * (1 - BAND)
    if macs() >= low:
        return
    live = sorted(_entries(masked, lambda i, p: p != 0), key=lambda e: abs(e[0]))[:SWAP_ZERO]
    back = [e for e in sorted(revivable, key=lambda e: -abs(e[0])) if params[e[1]].view(-1)[e[2]] == 0]
    with torch.no_grad():
        for v, i, j in back[:SWAP_REVIVE]:
            params[i].view(-1)[j] = v
            for w, k, m in live:
                params[k].view(-1)[m] = 0.0
                if low <= macs() <= budget:
                    return
                params[k].view(-1)[m] = w
            params[i].view(-1)[j] = 0.0


@dataclass
class LatencyGoal:
    """A latency target for GAL: the latency model of the original, the target in seconds, and how
    to measure a plan's slim model end to end (`latency_target.slim_latency`)."""

    model: object  # fxprune.latency_model.LatencyModel
    target_s: float
    measure: object  # Callable[[PruningPlan], float]


def _timing_plan(state) -> PruningPlan:
    """The structure of a mask state without its folds and scales: what its slim model's time depends on."""
    plan = state.plan
    return PruningPlan(keep=dict(plan.keep), remove_branches=list(plan.remove_branches),
                       drop_concat_inputs=list(plan.drop_concat_inputs))


def _predicted_s(goal: LatencyGoal, state, channels) -> float:
    """Predicted latency of a mask state: its channel groups' kept counts, without the layers of
    the blocks and branches it removes (`plan_removed_nodes`)."""
    kept = {g: len(k) for g, k in state.plan.keep.items() if g in goal.model.n_units}
    removed = plan_removed_nodes(channels, state.plan) if state.plan.remove_branches or state.plan.drop_concat_inputs \
        else frozenset()
    return predict_kept(goal.model, kept, removed)


def _fit_latency(analysis, cost, masked: SoftMaskedModel, goal: LatencyGoal):
    """After training: zero the smallest masks (channels, blocks, branches; ties in mask order) until
    the predicted latency is under a budget, measure the slim model, and shrink the budget until the
    measurement is under the target; a plan measured well under it gets larger budgets that stay
    under (`fit_measured`'s grow rounds). The masks end in the state of the plan returned.
    Raises LatencyUnreachableError (with the best measurement) when no budget does."""
    alive = sorted(_entries(masked, lambda i, p: p != 0), key=lambda e: abs(e[0]))
    base = [p.detach().clone() for p in masked.params()]
    original = goal.model.original_s

    def select(budget_s: float) -> PruningPlan:
        _largest_fitting(analysis, cost, masked, base, alive, lambda v: 0.0, budget_s, more_is_cheaper=True,
                         value=lambda state: _predicted_s(goal, state, analysis))
        state = mask_state(analysis, masked)
        predicted = _predicted_s(goal, state, analysis)
        if not predicted <= budget_s:
            raise LatencyUnreachableError(budget_s, predicted, original, " with every GAL mask at zero")
        return _timing_plan(state)

    fit = fit_measured(select, goal.measure, goal.target_s, latency_model=goal.model, channels=analysis,
                       grow=GROW_ROUNDS)
    select(fit.predicted_budget_s)  # deterministic: the masks of the plan that was measured under the target
    return fit


def _mask_step(run: _Run, opts: GALOptions, analysis, cost, progress: float, it: int) -> None:
    masks = run.masked.params()
    average_gradients(masks)  # every rank's FISTA step then zeroes the same entries
    if opts.mask_gradient == "mean" and run.since_step:
        for m in masks:
            if m.grad is not None:
                m.grad /= run.since_step
    before = [m.detach().clone() for m in masks]
    run.last = [torch.where(b != 0, b, prev) for b, prev in zip(before, run.last)] if run.last else before
    for g in run.fista.param_groups:
        g["lam"] = run.lam
    run.fista.step()
    for m in masks:
        m.grad = None
    run.since_step = 0
    ratio = state_macs(cost, mask_state(analysis, run.masked)) / cost.total_macs
    if run.budget is not None:
        if ratio * cost.total_macs <= run.budget:
            _revive(analysis, cost, run.masked, before, run.budget, run.last)
            ratio = state_macs(cost, mask_state(analysis, run.masked)) / cost.total_macs
            _freeze(run)
        else:
            target = run.budget / cost.total_macs
            path = 1 - (1 - target) * min(1.0, progress / opts.target_at)
            fading = state_macs(cost, mask_state(analysis, run.masked, zeroed=opts.steer_threshold))
            if fading / cost.total_macs > path:
                run.lam *= opts.lam_growth
    run.history.append({"iteration": it, "progress": round(progress, 4), "macs_ratio": ratio, "lam": run.lam,
                        "frozen": run.frozen})


def _generator(run: _Run) -> nn.Module:
    """The module the generator runs: the masked graph, or its copy with masked convs fused (soft
    gradients while the masks learn; hard once they are frozen, so zero channels cost nothing)."""
    if not run.fused:
        return run.masked.module

    return fuse_masked_convs(run.masked.module, mode="hard" if run.frozen else "soft", compact=True, cache_live=True)


def _freeze(run: _Run) -> None:
    run.frozen = True
    for m in run.masked.params():
        m.requires_grad_(False)
        m.grad = None
    run.forward = _generator(run)


def _loop(run: _Run, opts: GALOptions, analysis, cost, data, epochs: int, lr: float, *, adversarial: bool,
          loss_kind: str, device) -> list[dict]:
    try:
        per_epoch = len(data)
    except TypeError:
        per_epoch = None
    if per_epoch == 0:
        raise TrainingError("the GAL data is empty: pass an iterable of input batches or (inputs, targets)")
    if opts.max_steps_per_epoch:
        per_epoch = min(per_epoch or opts.max_steps_per_epoch, opts.max_steps_per_epoch)
    mask_lr = opts.mask_lr or opts.lr
    it, rows, last_factor = 0, [], 1.0
    run.masked.module.train()
    run.forward.train()
    for epoch in range(epochs):
        sums, seen = np.zeros(3), 0
        for k, batch in enumerate(_batches(data, epoch, opts.seed)):
            if opts.max_steps_per_epoch and k >= opts.max_steps_per_epoch:
                break
            inputs, targets = _split(batch)
            if loss_kind == "ce" and targets is None:
                raise TrainingError("fine-tuning with cross-entropy needs (inputs, targets) batches")
            progress = (epoch + k / per_epoch) / epochs if per_epoch else epoch / epochs
            factor = _lr_factor(opts, progress)
            for opt, base in ((run.opt_g, lr), (run.opt_d, lr), (run.fista, mask_lr)):
                for g in (opt.param_groups if opt is not None else []):
                    g["lr"] = base * factor
            if factor != last_factor and opts.fista_restart and run.fista is not None:
                run.fista.restart()
            last_factor = factor
            sums += _iteration(run, opts, inputs, targets, device, adversarial, loss_kind)
            seen += 1
            it += 1
            run.since_step += 1
            if run.fista is not None and not run.frozen and it % opts.mask_step == 0:
                _mask_step(run, opts, analysis, cost, progress, it)
            if opts.progress and sys.stderr.isatty():
                _bar(epoch, epochs, k + 1, per_epoch, sums[1] / seen)
        if seen == 0:
            raise TrainingError("the GAL data is empty: pass an iterable of input batches or (inputs, targets)")
        if per_epoch is None:
            per_epoch = seen
        ratio = state_macs(cost, mask_state(analysis, run.masked)) / cost.total_macs
        rows.append({"epoch": epoch + 1, "loss_d": sums[0] / seen, "loss_g": sums[1] / seen,
                     "data_loss": sums[2] / seen, "macs_ratio": ratio, "lam": run.lam})
        if opts.progress:
            print(f"GAL epoch {epoch + 1}/{epochs}: D {rows[-1]['loss_d']:.4f} G {rows[-1]['loss_g']:.4f} "
                  f"data {rows[-1]['data_loss']:.4f} MACs {ratio:.3f} lam {run.lam:.3g}", file=sys.stderr)
    return rows


def gal(analysis: ModelAnalysis, data: Iterable, constraints: Constraints, opts: GALOptions,
        teacher_source: nn.Module, latency: LatencyGoal | None = None):
    """Run GAL on `analysis`'s model (trained and folded in place: pass a private copy); returns
    (state, details). The plan in `state` carries every graph edit (`scale_inputs` included).
    With `latency`, the masks are thresholded after training until the slim model is measured under
    the target (`_fit_latency`), before the fine-tune; details["latency_fit"] holds the rounds."""
    if data is None:
        raise TrainingError("gal needs data=: an iterable of input batches (labels optional)")
    opts = with_rank0_seed(opts)
    torch.manual_seed(opts.seed)
    channels, cost = analysis.channels, analysis.cost
    masked = insert_soft_masks(channels, opts.structures, opts.mask_init, opts.seed)
    if not masked.params():
        raise ConfigError(f"GAL found nothing to mask for structures={opts.structures}: "
                          f"{len(channels.prunable_groups)} prunable groups, "
                          f"{len(analysis.structures.residual_branches)} residual branches, "
                          f"{len(analysis.structures.concat_inputs)} droppable concat inputs; "
                          f"choose structures the model has (run fxprune.analyze to see them)")
    param = next(iter(channels.gm.parameters()))
    device, dtype = param.device, param.dtype
    teacher = copy.deepcopy(teacher_source).train(opts.teacher_mode == "train")
    for p in teacher.parameters():
        p.requires_grad_(False)
    mask_ids = {id(p) for p in masked.params()}
    weights = [p for p in masked.module.parameters() if p.requires_grad and id(p) not in mask_ids]
    opt_g = torch.optim.SGD(weights, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    first = next(iter(data), None)
    if first is None:
        raise TrainingError("the GAL data is empty: pass an iterable of input batches or (inputs, targets)")
    with torch.no_grad(), eval_mode(teacher):
        features = output_features(_call(teacher, _split(first)[0], device)).shape[1]
    disc = make_discriminator(opts.discriminator, features, dtype, device)
    for module in (masked.module, teacher, disc):  # every rank starts from rank 0's networks
        sync_from_rank0(module)
    opt_d = torch.optim.SGD(disc.parameters(), lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    flops = constraints.flops
    budget = constraints.macs_limit(cost.total_macs) if flops < 1 else None
    l1_weights = None
    if opts.flops_weighted:
        costs = mask_costs(channels, cost, masked)
        mean = float(torch.cat([c.reshape(-1) for c in costs]).mean()) or 1.0
        l1_weights = [((c / mean) ** float(opts.flops_weighted)).to(dtype=dtype, device=device) for c in costs]
    fista = FISTA(masked.params(), opts.mask_lr or opts.lr, opts.lam, weights=l1_weights)
    used, why = fused_kernels.decide(opts.fused_kernels, masked.module)
    run = _Run(masked, teacher, disc, opt_g, opt_d, fista, opts.lam, budget, l1_weights, used)
    run.forward = _generator(run)
    was_training = channels.gm.training
    rows = _loop(run, opts, channels, cost, data, opts.epochs, opts.lr, adversarial=True, loss_kind="mse",
                 device=device)
    reached_by = "frozen at target" if run.frozen else "lam"
    if budget is not None and state_macs(cost, mask_state(channels, masked)) > budget:
        _threshold_to(channels, cost, masked, budget, flops)
        reached_by = "threshold at the end"
    latency_fit = None
    if latency is not None:
        latency_fit = _fit_latency(channels, cost, masked, latency)
        reached_by += ", then the latency fit"
    if opts.finetune_epochs:
        _freeze(run)
        has_labels = _split(next(iter(data)))[1] is not None
        run.opt_g = torch.optim.SGD(weights, lr=opts.finetune_lr, momentum=opts.momentum,
                                    weight_decay=opts.weight_decay)
        rows += _loop(run, opts, channels, cost, data, opts.finetune_epochs, opts.finetune_lr, adversarial=False,
                      loss_kind="ce" if has_labels else "mse", device=device)
    sync_from_rank0(masked.module)  # BN running statistics drift per rank; rank 0's are folded and kept
    state = mask_state(channels, masked)
    unfolded = fold_masks(channels, masked, state)
    state.plan.scale_inputs = list(unfolded)
    channels.gm.train(was_training)
    details = {
        "structures": list(opts.structures), "discriminator": opts.discriminator,
        "lam_initial": opts.lam, "lam_final": run.lam, "reached_by": reached_by,
        "flops_weighted": opts.flops_weighted,
        "macs_ratio": state_macs(cost, state) / cost.total_macs,
        "masks": {"channel_groups": len(masked.channel), "blocks": len(masked.blocks),
                  "branches": len(masked.branches)},
        "removed_blocks": state.removed_blocks, "removed_branches": state.removed_branches,
        "widths": {str(g): list(w) for g, w in state.widths.items()},
        "unmasked": dict(masked.skipped), "scales_left_in_graph": [a for a, _, _ in unfolded],
        "epochs": rows, "mask_steps": run.history, "fused_kernels": {"used": used, "why": why},
    }
    if latency_fit is not None:
        details["latency_fit"] = {"measured_s": latency_fit.measured_s, "rounds": latency_fit.rounds}
    return state, details


@dataclass(frozen=True)
class GALMethod:
    """GAL as a `fxprune.methods.Method`: learns masks on a private copy of the model against the
    original as baseline; returns the plan (channels, branches, blocks, constant scales) and the
    copy's weights with the surviving masks folded in."""

    name = "gal"
    options_type = GALOptions
    supports = frozenset({"latency"})  # thresholds its masks after training until measured under the target
    needs_data = True

    def run(self, context: MethodContext) -> MethodResult:
        if context.original is None:
            raise ConfigError("gal needs the original model as its baseline")
        goal = model = None
        if context.constraints.has_latency:
            model = profile_latency(context.analysis, **asdict(context.measure_on))
            goal = LatencyGoal(model, context.constraints.latency_target_s(model.original_s),
                               lambda plan: slim_latency(context, plan, model))
            floor = model.predict({g: 1 for g in model.n_units})
            if tuple(context.options.structures) == ("channel",) and not floor <= goal.target_s:
                raise LatencyUnreachableError(goal.target_s, floor, model.original_s,
                                              " with every channel group at one channel, before training")
        work = context.private_copy()
        state, details = gal(work, context.data, context.constraints, context.options, context.original, goal)
        if goal is not None:
            fit = details["latency_fit"]
            details["latency"] = latency_details(model, context, state.plan, fit["measured_s"],
                                                 {"rounds": fit["rounds"]})
        return MethodResult(state.plan, details, weights=work.traced.graph_module.state_dict())
