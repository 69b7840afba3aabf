"""Gate Decorator (You et al., NeurIPS 2019) on fxprune's channel groups.

Gates (`passes.gates`) sit after every BatchNorm of a prunable group. A channel's importance is
the Taylor estimate |g * dL/dg| accumulated over a Tick; the units of a coupled group (residual
adds) sum their sites' scores and are pruned together; units are ranked globally, each group
counted once per site as in the authors' code; every group keeps its top 10% (at least 1).

Schedules (`schedule=`):
* ``tick_tock`` (default): Tock, then Ticks pruning a fraction `p` of the remaining units each, a
  Tock every `T` Ticks (L1 penalty `sparse_lambda` on the gates, triangular LR), until the MACs
  counted on the graph reach the target; the Tick that crosses it prunes only the fewest of its
  lowest-scored units that reach it, then gives back, best first, those it can spare
  (`_last_tick`), and at the end of the schedule units of earlier Ticks fill what is left
  (`_fill_slack`), so the result lands within a unit of the target instead of up to p below it
  (equal MACs when methods are compared);
* ``tick_only``: the same without Tocks;
* ``one_shot``: one Tick of scores, then prune straight to the target.
Then `finetune_epochs` of fine-tuning (triangular LR, momentum 0, as the authors), the gates are
folded into the BatchNorms and the masked channels removed by the core rewrite.

``fused_kernels=True`` (by default ``"auto"``: on when training on a CPU without module hooks,
`fxprune.methods.fused_kernels`) trains the gated graph through `passes.fuse_masked_conv` in hard mode with
compact chains: where a gated BN output feeds the next conv through activations only (a residual
block's inner channels, VGG's chain), the channels between the convs run compact, live ones only
(`passes.compact_chain`); elsewhere each conv whose BN output is gated hands its pruned channels
(mask 0) to ``masked_conv2d`` and skips them, and so does the next conv for its zero input
channels. Training is unchanged (only the pruned channels' BN running statistics differ, and
those channels are removed); whether it is faster depends on the layer sizes and the device
(`docs/kernels.md`).

Under torch.distributed (``torchrun``, `fxprune.train.init_distributed()`, a DataLoader with a
DistributedSampler): Ticks, Tocks and the fine-tune run under DDP, the Taylor scores are averaged
over the ranks, rank 0's pruning decision is used by every rank (`fxprune.distributed`), a latency
target is measured on rank 0, and rank 0's BN statistics are kept: every rank gets the same model.

Authors' defaults (CIFAR ResNet-56): p=0.002, T=10, tock_epochs=10, tick lr 1e-3, Tock/fine-tune
triangular 1e-3 -> 1e-2 -> 1e-3, sparse_lambda=1e-3, min keep 10%, fine-tune 40 epochs. They are
the defaults here except p, tock_epochs and finetune_epochs, which small runs scale (see options).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import numpy as np
import torch
from torch import nn

from fxprune.constraints import Constraints
from fxprune.distributed import average_across_ranks, rank0_value, sync_from_rank0
from fxprune.errors import ConfigError, LatencyUnreachableError, TargetUnreachableError
from fxprune.latency_model import profile_latency
from fxprune.passes.fuse_masked_conv import fuse_masked_convs
from fxprune.passes.gates import GatedModel, fold_gates, insert_gates
from fxprune.passes.plan import PruningPlan
from fxprune.train import TrainConfig, TrainingError, train

from .. import fused_kernels
from ..base import MethodContext, MethodResult
from ..latency_selection import fit_measured, predict_plan, select_under_latency
from ..latency_target import latency_details, slim_latency
from ..selection import select

SCHEDULES = ("tick_tock", "tick_only", "one_shot")


@dataclass
class GateDecoratorOptions:
    schedule: str = "tick_tock"
    p: float = 0.002  # fraction of the remaining prunable units pruned per Tick
    T: int = 10  # Ticks per Tock
    tick_lr: float = 1e-3
    tick_epochs: int = 1
    tock_epochs: int = 10
    tock_lr: float = 1e-2  # peak of the triangular schedule; it starts and ends at tock_lr / 10
    sparse_lambda: float = 1e-3
    finetune_epochs: int = 40
    weight_decay: float = 5e-4
    min_keep_ratio: float = 0.1
    max_ticks: int = 100_000
    seed: int = 0
    tock_data: Iterable | None = None  # Tock / fine-tune batches (default: the same as the Ticks')
    # train through compact regions / torch.ops.fxprune.masked_conv2d (docs/kernels.md); "auto": on a
    # CPU without module hooks (measured faster there, slower on a GPU: `fxprune.methods.fused_kernels`)
    fused_kernels: bool | str = "auto"
    progress: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown gate_decorator schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}")
        if not 0 < self.p < 1:
            raise ConfigError(f"p={self.p} must be in (0, 1)")
        fused_kernels.check(self.fused_kernels, "gate_decorator")


class _Scores:
    """Per-unit Taylor scores of every prunable group, accumulated after each backward pass."""

    def __init__(self, channels, gated: GatedModel):
        self.gated = gated
        self.per_group = {g.index: np.zeros(g.n_units) for g in channels.prunable_groups}

    def reset(self):
        for v in self.per_group.values():
            v[:] = 0

    def all_reduce(self):
        """Average the scores over ranks (torchrun/DDP), so every rank ranks the same numbers."""
        tensors = [torch.from_numpy(v) for v in self.per_group.values()]  # views: averaged in place
        average_across_ranks(tensors)

    def accumulate(self):
        for s in self.gated.sites:
            gate = getattr(self.gated.module, s.gate)
            if gate.grad is None:
                continue
            score = (gate.detach() * gate.grad.detach()).abs().reshape(-1).cpu().numpy().astype(np.float64)
            np.add.at(self.per_group[s.group], s.unit_of_channel, score)


def _kept(channels, group: int, keep: dict[int, np.ndarray]) -> np.ndarray:
    kept = np.zeros(channels.groups[group].n_units, dtype=bool)
    kept[keep[group]] = True
    return kept


def _mask_units(channels, gated: GatedModel, keep: dict[int, np.ndarray]) -> None:
    """Set every site's mask (and the per-unit masks its LayerNorms read) to `keep`."""
    with torch.no_grad():
        for s in gated.sites:
            mask = getattr(gated.module, s.mask)
            kept = _kept(channels, s.group, keep)
            mask.copy_(torch.as_tensor(kept[s.unit_of_channel], dtype=mask.dtype).reshape(mask.shape))
        for group, name in gated.unit_masks.items():
            mask = getattr(gated.module, name)
            mask.copy_(torch.as_tensor(_kept(channels, group, keep), dtype=mask.dtype))


def _macs(channels, cost, keep) -> float:
    return cost.macs(channels.keep_roots(keep))


def _tick(gated, scores, data, opts, targets_from) -> None:
    frozen = [m.weight for m in gated.module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    flags = [w.requires_grad for w in frozen]
    for w in frozen:
        w.requires_grad_(False)
    scores.reset()
    try:
        train(gated.module, data, TrainConfig(epochs=opts.tick_epochs, lr=opts.tick_lr, schedule="constant",
                                              weight_decay=opts.weight_decay, seed=opts.seed, progress=opts.progress),
              after_backward=scores.accumulate, targets_from=targets_from)
    finally:
        for w, f in zip(frozen, flags):
            w.requires_grad_(f)
    scores.all_reduce()


def _tock(gated, data, opts, epochs, penalty, targets_from, momentum=0.9) -> None:
    data = opts.tock_data if opts.tock_data is not None else data
    gates = gated.gates()
    extra = (lambda _m: penalty * sum(g.abs().sum() for g in gates)) if penalty else None
    train(gated.module, data, TrainConfig(epochs=epochs, lr=opts.tock_lr, schedule="triangular", peak_at=0.5,
                                          lr_min_ratio=0.1, momentum=momentum, weight_decay=opts.weight_decay,
                                          seed=opts.seed, progress=opts.progress),
          extra_loss=extra, targets_from=targets_from)


def _prune_count(keep: dict, opts) -> int:
    """Units one Tick prunes: floor(p * remaining), at least 1."""
    return max(1, math.floor(opts.p * sum(len(k) for k in keep.values())))


def _prune_step(channels, scores, keep, opts, repeats: dict[int, int], n: int | None = None) -> dict[int, np.ndarray]:
    """Drop `n` (default `_prune_count`) units by the authors' global threshold; returns the new keep.

    Each group's candidates (all but its top `min_keep_ratio`, at least 1) enter the ranking once
    per gate site of the group, as the authors count a shared channel once per member BN.
    """
    candidates, pool = [], []
    for gi, kept in keep.items():
        minimal = max(1, math.floor(opts.min_keep_ratio * channels.groups[gi].n_units))
        s = scores.per_group[gi][kept]
        protected = set(kept[np.argsort(-s, kind="stable")[:minimal]].tolist())
        candidates.append((gi, protected))
        pool.extend(v for u, v in zip(kept, s) if u not in protected for _ in range(repeats.get(gi, 1)))
    if not pool:
        return keep
    n = _prune_count(keep, opts) if n is None else n
    thr = sorted(pool)[min(n, len(pool)) - 1]
    new = {}
    for gi, protected in candidates:
        kept = keep[gi]
        s = scores.per_group[gi][kept]
        new[gi] = np.asarray([u for u, v in zip(kept, s) if v > thr or u in protected], dtype=np.int64)
    return new


def gate_decorator(channels, cost, data: Iterable, constraints: Constraints, opts: GateDecoratorOptions,
                   targets_from: nn.Module | None = None, log: list | None = None,
                   fits: Callable[[dict], bool] | None = None,
                   one_shot_select: Callable[[dict], PruningPlan] | None = None,
                   ungated: list | None = None, kernels: dict | None = None) -> PruningPlan:
    """Run the method on `analysis.gm`'s modules (trained in place) and return the plan.

    The caller passes an analysis of its own private copy (`MethodContext.private_copy`): training
    changes its weights, and the gates are folded into them at the end. Each Tick appends a row to
    `log`. Ticks go on until `fits(keep)` (default: the MACs fit `constraints`); `one_shot_select`
    replaces the one-shot schedule's FLOPs selection (both are how a latency target plugs in).
    The prunable groups no gate could be placed on (kept whole) are appended to `ungated`;
    whether it trained through the fused graph, and why, goes into `kernels` ("used", "why").
    """
    log = [] if log is None else log
    if data is None:
        raise TrainingError("gate_decorator needs data=: an iterable of (inputs, targets) batches")
    torch.manual_seed(opts.seed)
    gated = insert_gates(channels)
    used, why = fused_kernels.decide(opts.fused_kernels, gated.module)
    if kernels is not None:
        kernels.update(used=used, why=why)
    if used:  # same parameters and mask buffers; masked convs skip their pruned channels
        gated = replace(gated, module=fuse_masked_convs(gated.module, mode="hard", compact=True,
                                                             cache_live=True))
    scores = _Scores(channels, gated)
    # a group no gate could be placed on has no score: it stays whole (`GatedModel.ungated`)
    keep = {g.index: np.arange(g.n_units) for g in channels.prunable_groups if g.index not in gated.ungated}
    if ungated is not None:
        ungated.extend(gated.ungated)
    flops, budget = constraints.flops, constraints.macs_limit(cost.total_macs)
    land = fits is None  # a MACs target: the last Tick lands on it (a latency stop measures instead)
    if fits is None:
        fits = lambda keep: _macs(channels, cost, keep) <= budget  # noqa: E731
    repeats: dict[int, int] = {}
    for site in gated.sites:
        repeats[site.group] = repeats.get(site.group, 0) + 1
    if opts.schedule == "one_shot":
        _tick(gated, scores, data, opts, targets_from)
        per_group = {gi: scores.per_group[gi] for gi in keep}
        plan = (one_shot_select(per_group) if one_shot_select is not None else
                select(channels, cost, per_group, Constraints(flops=flops, min_ratio=opts.min_keep_ratio)))
        keep = rank0_value(plan.keep)  # per-rank float noise must not split the decision
    else:
        if opts.schedule == "tick_tock":
            _tock(gated, data, opts, opts.tock_epochs, opts.sparse_lambda, targets_from)
        ticks = 0
        while not fits(keep):
            if ticks >= opts.max_ticks:
                raise TargetUnreachableError(flops, _macs(channels, cost, keep) / cost.total_macs,
                                             f" after max_ticks={opts.max_ticks} Ticks")
            _tick(gated, scores, data, opts, targets_from)
            new = _prune_step(channels, scores, keep, opts, repeats)
            if land and fits(new):  # the last Tick: only as many units as it takes to reach the target
                new = _last_tick(channels, scores, keep, opts, repeats, fits)
            if all(len(new[g]) == len(keep[g]) for g in keep):
                raise TargetUnreachableError(flops, _macs(channels, cost, keep) / cost.total_macs,
                                             " (every group is at its 10% minimum)")
            keep = rank0_value(new)
            _mask_units(channels, gated, keep)
            ticks += 1
            log.append({"tick": ticks, "macs_ratio": _macs(channels, cost, keep) / cost.total_macs})
            if opts.schedule == "tick_tock" and ticks % opts.T == 0 and not fits(keep):
                _tock(gated, data, opts, opts.tock_epochs, opts.sparse_lambda, targets_from)
    if land and opts.schedule != "one_shot":
        keep = rank0_value(_fill_slack(channels, gated, keep, scores, fits))
    _mask_units(channels, gated, keep)
    if opts.finetune_epochs:
        _tock(gated, data, opts, opts.finetune_epochs, 0.0, targets_from, momentum=0.0)
    sync_from_rank0(gated.module)  # BN statistics drift per rank after the last step
    fold_gates(channels, gated)
    return PruningPlan(keep=keep)


def _last_tick(channels, scores, keep, opts, repeats, fits) -> dict[int, np.ndarray]:
    """The Tick that crosses the target prunes the fewest lowest-scored units that fit (binary
    search on the count, same ranking): the result lands within one unit of the MACs target
    instead of overshooting by up to p of the remaining units (0.369 for a 0.4 target before), so
    methods compared at a target are compared at equal MACs."""
    lo, hi = 1, _prune_count(keep, opts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(_prune_step(channels, scores, keep, opts, repeats, n=mid)):
            hi = mid
        else:
            lo = mid + 1
    return _give_back(keep, _prune_step(channels, scores, keep, opts, repeats, n=lo), scores, fits)


def _give_back(before: dict, after: dict, scores, fits) -> dict[int, np.ndarray]:
    """The units the last Tick removed back into the model, best-scored first, while the target
    still fits: one unit of a coupled stream can cost several % of a small target, so the fewest
    units by count may still overshoot it; cheaper units it removed with it fill what it leaves.
    Units of earlier Ticks come back only at the end of the schedule (`_fill_slack`)."""
    after = {g: np.asarray(k) for g, k in after.items()}
    removed = [(float(scores.per_group[g][u]), g, int(u)) for g in before
               for u in np.setdiff1d(before[g], after[g])]
    for _, g, u in sorted(removed, reverse=True):
        trial = dict(after)
        trial[g] = np.sort(np.append(after[g], u))
        if fits(trial):
            after = trial
    return after


def _fill_slack(channels, gated: GatedModel, keep: dict, scores, fits) -> dict[int, np.ndarray]:
    """After the last Tick, units of any earlier Tick back into the model while the target still
    fits (best last-Tick score first; earlier units score 0 and follow in group order): the last
    Tick's own units cannot always fill what one unit of a coupled stream leaves (ResNet-20 at 5 %
    of the MACs landed 1.7 % under), and methods are compared at equal MACs. A revived unit comes
    back with its gate as it was (small: it scored lowest) and with its BatchNorm running statistics
    reset to (0, 1): while it was off they went on changing differently under `fused_kernels` (the
    conv skipped it) and plain masks, so resetting them makes both runs identical again; the
    fine-tune then re-estimates them."""
    full = {g: np.arange(channels.groups[g].n_units) for g in keep}
    filled = _give_back(full, keep, scores, fits)
    revived = {g: np.setdiff1d(filled[g], keep[g]) for g in keep}
    if not any(len(v) for v in revived.values()):
        return keep
    # the analysis graph names each site's module: the gated graph shares its modules, but under
    # `fused_kernels` its BatchNorm nodes may be folded into compact convs
    nodes = {n.name: n for n in channels.gm.graph.nodes}
    with torch.no_grad():
        for site in gated.sites:
            back = revived.get(site.group)
            node = nodes.get(site.node)
            if back is None or not len(back) or site.params is not None or node is None or node.op != "call_module":
                continue
            mod = channels.gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                channels_back = torch.as_tensor(np.flatnonzero(np.isin(site.unit_of_channel, back)))
                mod.running_mean[channels_back] = 0.0
                mod.running_var[channels_back] = 1.0
    return filled


@dataclass(frozen=True)
class GateDecoratorMethod:
    """Gate Decorator as a `fxprune.methods.Method`: trains gates on a private copy, returns the
    plan and the copy's weights with the gates folded in."""

    name = "gate_decorator"
    options_type = GateDecoratorOptions
    supports = frozenset({"latency"})  # its own min_keep_ratio; no round_to / min_channels
    needs_data = True

    def run(self, context: MethodContext) -> MethodResult:
        opts, c = context.options, context.constraints
        work = context.private_copy()
        log: list = []
        ungated: list = []
        kernels: dict = {}
        if not c.has_latency:
            plan = gate_decorator(work.channels, work.cost, context.data, c, opts, targets_from=context.original,
                                  log=log, ungated=ungated, kernels=kernels)
            return MethodResult(plan, {"schedule": opts.schedule, "ticks": log, **_ungated(work, ungated),
                                       "fused_kernels": kernels}, weights=work.traced.graph_module.state_dict())
        latency = _LatencyStop(work, context)
        try:
            plan = gate_decorator(work.channels, work.cost, context.data, c, opts, targets_from=context.original,
                                  log=log, fits=latency.fits, one_shot_select=latency.select, ungated=ungated,
                                  kernels=kernels)
        except LatencyUnreachableError:
            raise
        except TargetUnreachableError as e:  # the Ticks ran out before the latency stop fitted
            raise latency.unreachable(e.minimum) from e
        measured = latency.checks[-1]["measured_s"] if latency.checks else slim_latency(context, plan, latency.model)
        details = {"schedule": opts.schedule, "ticks": log, **_ungated(work, ungated), "fused_kernels": kernels,
                   "latency": latency_details(latency.model, context, plan, measured, {"checks": latency.checks})}
        return MethodResult(plan, details, weights=work.traced.graph_module.state_dict())


def _ungated(work, groups: list[int]) -> dict:
    """The report's note of the prunable groups kept whole because no gate could score them."""
    if not groups:
        return {}
    return {"ungated_groups": {str(gi): work.channels.groups[gi].leading.target for gi in groups}}


class _LatencyStop:
    """Gate Decorator under a latency target: Ticks go on until the pruned units' slim model is
    predicted under the budget AND, measured end to end, under the target; a measurement over the
    target shrinks the predicted budget (by target / measured, at least 3 %) and the Ticks go on."""

    def __init__(self, work, context: MethodContext):
        self.work, self.context, self.c = work, context, context.constraints
        self.model = profile_latency(work, **asdict(context.measure_on))
        self.target = self.c.latency_target_s(self.model.original_s)
        self.budget = self.target
        self.limit = self.c.macs_limit(work.cost.total_macs)
        self.checks: list[dict] = []
        self.best_predicted = math.inf  # the smallest prediction `fits` saw

    def unreachable(self, macs_kept: float) -> LatencyUnreachableError:
        """The typed error when the Ticks end (every group at its minimum, or max_ticks) before the
        stop fits: the best measured latency when a plan was measured, else the best predicted one;
        every measured check in `rounds`."""
        measured = [c["measured_s"] for c in self.checks if c.get("measured_s") is not None]
        best = min(measured) if measured else self.best_predicted
        return LatencyUnreachableError(
            self.target, best, self.model.original_s,
            f" (Gate Decorator's Ticks ended at {macs_kept:.4f} of the MACs without fitting it)",
            measured=bool(measured), best_measured_s=min(measured) if measured else None, rounds=self.checks)

    def fits(self, keep: dict) -> bool:
        channels = self.work.channels
        if _macs(channels, self.work.cost, keep) > self.limit:
            return False
        plan = PruningPlan(keep=keep)
        predicted = predict_plan(self.model, plan)
        self.best_predicted = min(self.best_predicted, predicted)
        if predicted > self.budget:
            return False
        measured = slim_latency(self.context, plan, self.model)
        self.checks.append({"budget_s": self.budget, "predicted_s": predicted, "measured_s": measured})
        if measured <= self.target:
            return True
        self.budget = min(self.budget * 0.97, predicted * self.target / measured)
        return False

    def select(self, scores: dict) -> PruningPlan:
        rules = Constraints(flops=self.c.flops, latency=self.c.latency, latency_ms=self.c.latency_ms,
                            min_ratio=self.context.options.min_keep_ratio)
        channels, cost = self.work.channels, self.work.cost
        fit = fit_measured(lambda b: select_under_latency(channels, cost, scores, rules, self.model, b),
                           lambda plan: slim_latency(self.context, plan, self.model), self.target, latency_model=self.model)
        self.checks.extend(fit.rounds)
        return fit.plan
