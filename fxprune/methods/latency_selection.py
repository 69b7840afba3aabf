"""Choose what to keep under a latency budget (HALP-style), on a model's latency staircase.

A latency model (`fxprune.latency_model.LatencyModel`: `predict(kept) -> seconds`,
`group_steps(group) -> ascending kept-unit counts`, `original_s`) says that a group's latency is
a staircase in its kept units: keeping a few units fewer than an edge of
`group_steps` saves nothing until the next edge below. So a group's kept count is only ever one of
its *candidates*: the model's edges, each rounded DOWN to a count the channel rules allow (a
multiple of `round_to`'s step in units, at least the rule minimum; rounding down never crosses
into a slower step), plus the full count and the rule minimum (`_candidates`).

`select_under_latency` (the reference is HALP's knapsack; this is a greedy with step-aware moves):

1. Every group starts full. If every group at its rule minimum is still predicted over the budget
   (or over the MACs limit of `constraints.flops`) no plan exists: `LatencyUnreachableError`
   (`TargetUnreachableError` for MACs), raised before any work.
2. A *down move* takes one group to its next lower candidate. Its cost is the importance lost: the
   sum of the per-group-normalised scores (`selection.normalize`) of the units it drops, least
   important first (the order of `selection.select`). Its gain is what it saves on each limit
   still exceeded, as a fraction of the original: predicted seconds / `original_s`, and
   MACs / total MACs while `constraints.fits_macs` fails. Gains are recomputed for every group
   after every move (the model need not be additive: a layer's time depends on both its groups).
3. The move with the best gain / cost is taken (cost 0 counts as infinite; ties: larger gain;
   a move with no gain is taken only when no move has one, the cheapest first), until
   `predict(kept) <= budget_s` and the MACs fit. Counts only go down and the all-minimum state
   fits (step 1), so this ends, and ends under the budget.
4. Fill: steps of one candidate *up* (importance regained / predicted seconds added, best first;
   an up move that adds no time first) are taken while the plan stays under both limits. The greedy
   overshoots by up to one step; this takes back what still fits. Counts only go up: it ends.

The result never exceeds the predicted budget: every state it returns was predicted under it.
Cost: (moves x prunable groups) calls of `predict` (and of `CostModel.macs` while `flops` binds).

`fit_measured` closes the loop on the device: select at a predicted budget, measure the slim
model end to end, shrink the budget by target/measured until the measurement is under target.
`snap_to_steps` is `round_to="auto"` for a FLOPs-target selection: each group's count moves to a
latency step edge next to it (its docstring states the rule).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fxprune.constraints import Constraints
from fxprune.errors import ConfigError, LatencyUnreachableError, TargetUnreachableError
from fxprune.methods.selection import _keep_array, _plan, normalize
from fxprune.passes.plan import GroupChoice, PruningPlan, group_choices, kept_count, plan_removed_nodes


class LatencyModelLike(Protocol):
    """What this module needs of `fxprune.latency_model.LatencyModel`."""

    original_s: float

    def predict(self, kept: Mapping[int, int]) -> float: ...

    def group_steps(self, group: int) -> np.ndarray: ...


def _round_to(constraints: Constraints) -> int | None:
    """The integer round_to, or None (also for round_to="auto", which `snap_to_steps` implements)."""
    r = constraints.round_to
    return r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else None


def _choices(channels, scores, constraints: Constraints) -> list[GroupChoice]:
    return group_choices(channels, scores, constraints.min_channels, constraints.min_ratio, _round_to(constraints))


def _candidates(c: GroupChoice, edges) -> np.ndarray:
    """The counts group `c` may keep (module docstring): each edge rounded down to an allowed count
    (never below the rule minimum), plus the full count and the rule minimum; ascending, unique.
    Every candidate k satisfies kept_count(c, k) == k."""
    n, floor = len(c.units), kept_count(c, 0)
    out = {n, floor}
    for e in np.asarray(edges, dtype=np.float64).ravel():
        if not math.isfinite(e) or e >= n:
            continue
        out.add(max(int(e) // c.step * c.step, floor))
    return np.array(sorted(out), dtype=np.int64)


@dataclass(frozen=True)
class Branch:
    """A residual block the selection may remove (`Constraints.blocks`): the branch of one add
    (`key` = (add node, operand), as `PruningPlan.remove_branches`), the nodes that go with it
    (`plan_removed_nodes`), and `inner`: the selection's choices (indices) of the prunable groups
    that live only inside it, whose importance is what removing it costs."""

    key: tuple[str, int]
    nodes: frozenset
    inner: tuple[int, ...]


def removable_branches(channels, choices: list[GroupChoice]) -> list[Branch]:
    """The residual blocks a latency selection may remove: per residual add, its branch with the
    most MACs (the block's body; the other operand is its shortcut, which stays), when at least one
    prunable group lives only inside it (else removing it would cost no importance, and a greedy
    ranking importance per second would take it first whatever it computes). A group lives inside
    when every module (or attribute) holding its channels is used by the branch's nodes alone."""
    if channels.structures is None:
        return []
    users: dict[str, set] = {}
    for n in channels.gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            users.setdefault(n.target, set()).add(n.name)

    def inside(group, nodes) -> bool:
        for m in group.members:
            owner = m.target if m.target in users else m.target.rsplit(".", 1)[0]
            if not users.get(owner) or not users[owner] <= nodes:
                return False
        return True

    out = []
    for b in channels.structures.residual_bodies():
        nodes = plan_removed_nodes(channels, PruningPlan(remove_branches=[(b.add, b.operand)]))
        inner = tuple(i for i, c in enumerate(choices) if inside(channels.groups[c.index], nodes))
        if inner:
            out.append(Branch((b.add, b.operand), nodes, inner))
    return out


NONE_GONE: frozenset = frozenset()


def predict_kept(latency_model: LatencyModelLike, kept, removed: frozenset = NONE_GONE) -> float:
    """`latency_model.predict(kept)`, leaving the layers of the `removed` nodes out when there are
    any (a model without removed structures, such as a test's fake, need not take the argument)."""
    return float(latency_model.predict(kept, removed) if removed else latency_model.predict(kept))


class _State:
    """Counts per choice, with the importance lost per candidate, predictions and MACs on demand.
    `gone`: indices into `branches` of the residual blocks a state removes (empty without blocks)."""

    def __init__(self, channels, cost, scores, choices, latency_model, branches: list[Branch] | None = None):
        self.channels, self.cost, self.choices, self.model = channels, cost, choices, latency_model
        self.cands = [_candidates(c, latency_model.group_steps(c.index)) for c in choices]
        self.branches = list(branches or [])
        # lost[i][j]: normalised importance of the units dropped when keeping cands[i][j] units
        self.lost, self.whole = [], []
        for c, cand in zip(choices, self.cands):
            prefix = np.concatenate([[0.0], np.cumsum(normalize(np.asarray(scores[c.index], dtype=np.float64))[c.order])])
            self.lost.append(prefix[len(c.units) - cand])
            self.whole.append(float(prefix[len(c.units)]))
        self._nodes: dict[frozenset, frozenset] = {NONE_GONE: frozenset()}

    def counts(self, pos) -> list[int]:
        return [int(cand[p]) for cand, p in zip(self.cands, pos)]

    def removed_nodes(self, gone) -> frozenset:
        if gone not in self._nodes:
            self._nodes[gone] = frozenset().union(*(self.branches[b].nodes for b in gone))
        return self._nodes[gone]

    def frozen(self, gone) -> set[int]:
        """Choices inside a removed block: their layers are gone, so moving them changes nothing."""
        return {i for b in gone for i in self.branches[b].inner}

    def covered(self, b: int, gone) -> bool:
        """Block `b` lies inside another removed block (a nested residual): it goes with that one."""
        return any(o != b and self.branches[b].key[0] in self.branches[o].nodes for o in gone)

    def branch_lost(self, pos, b: int) -> float:
        """Importance the block `b` still holds in `pos`: its inner groups' kept units."""
        return sum(self.whole[i] - self.lost[i][pos[i]] for i in self.branches[b].inner)

    def predict(self, pos, gone=NONE_GONE) -> float:
        return predict_kept(self.model, {c.index: k for c, k in zip(self.choices, self.counts(pos))},
                            self.removed_nodes(gone))

    def predict_moves(self, pos, step: int, gone=NONE_GONE) -> np.ndarray:
        """Predicted seconds after moving each group by `step` candidates (inf where it cannot
        move, or sits inside a removed block), in one batched call when the model has `predict_rows`."""
        out = np.full(len(pos), np.inf)
        frozen = self.frozen(gone)
        movable = [i for i in range(len(pos)) if 0 <= pos[i] + step < len(self.cands[i]) and i not in frozen]
        if not movable:
            return out
        if not hasattr(self.model, "predict_rows"):
            for i in movable:
                out[i] = self.predict(_moved(pos, i, step), gone)
            return out
        order = self.model.group_order
        column = {g: j for j, g in enumerate(order)}
        base = np.asarray([self.model.n_units[g] for g in order], dtype=np.float64)
        for c, k in zip(self.choices, self.counts(pos)):
            base[column[c.index]] = k
        rows = np.repeat(base[None, :], len(movable), axis=0)
        for r, i in enumerate(movable):
            rows[r, column[self.choices[i].index]] = self.cands[i][pos[i] + step]
        out[movable] = self.model.predict_rows(rows, self.removed_nodes(gone)) if gone else self.model.predict_rows(rows)
        return out

    def macs(self, pos, gone=NONE_GONE) -> float:
        return self.cost.macs(_keep_array(self.channels, self.choices, self.counts(pos)), self.removed_nodes(gone))

    def macs_removed_by_moves(self, pos) -> np.ndarray:
        """MACs each group's down move would remove (0 where it cannot move), recounting only the
        node terms that scale with that group (`CostModel.macs_touching`)."""
        if not hasattr(self, "_touching"):
            self._touching = [self.cost.macs_touching(c.units) for c in self.choices]
        keep = _keep_array(self.channels, self.choices, self.counts(pos))
        out = np.zeros(len(pos))
        for i, c in enumerate(self.choices):
            if pos[i] == 0:
                continue
            n = len(c.units)
            dropped = c.units[c.order[n - int(self.cands[i][pos[i]]): n - int(self.cands[i][pos[i] - 1])]]
            before = self._touching[i].total(keep, [])
            keep[dropped] = False
            out[i] = before - self._touching[i].total(keep, [])
            keep[dropped] = True
        return out

    def plan(self, pos, gone=NONE_GONE) -> PruningPlan:
        plan = _plan(self.choices, self.counts(pos))
        plan.remove_branches = [self.branches[b].key for b in sorted(gone) if not self.covered(b, gone)]
        return plan


def _moved(pos, i, step):
    out = list(pos)
    out[i] += step
    return out


ALLOCATIONS = ("importance", "uniform")


def select_under_latency(channels, cost, scores: dict[int, np.ndarray], constraints: Constraints,
                         latency_model: LatencyModelLike, budget_s: float, allocation: str = "importance") -> PruningPlan:
    """The plan keeping the most importance whose predicted latency is at most `budget_s` seconds
    and whose MACs fit `constraints` (module docstring). Raises LatencyUnreachableError when every
    group at its minimum is still predicted over `budget_s`, TargetUnreachableError when the MACs
    cannot fit.

    `allocation="uniform"` (the `uniform` method) keeps one shared fraction of every group instead:
    the largest fraction r whose plan -- each group at the highest candidate count <= r x its
    units, so on a step edge -- is predicted under the budget (bisection on r), then the same fill.
    Why offer it: the importance greedy spends the cut where time goes, which on a small
    high-resolution network can leave an early stream a channel or two wide; a uniform network is
    what a FLOPs-oriented tool gives at a global ratio, here on the latency model's step edges."""
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation={allocation!r}: choose from {', '.join(ALLOCATIONS)}")
    choices = _choices(channels, scores, constraints)
    if not choices:
        return PruningPlan()
    blocks = constraints.blocks and allocation == "importance"
    s = _State(channels, cost, scores, choices, latency_model, removable_branches(channels, choices) if blocks else None)
    total, original = cost.total_macs, latency_model.original_s
    lowest, every = [0] * len(choices), frozenset(range(len(s.branches)))
    macs_min = s.macs(lowest, every)
    if not constraints.fits_macs(macs_min, total):
        raise TargetUnreachableError(constraints.flops, macs_min / total,
                                     f" ({len(choices)} prunable groups; the rest is fixed by boundaries)")
    predicted_min = s.predict(lowest, every)
    if not predicted_min <= budget_s:
        removable = f" and all {len(every)} removable residual blocks removed" if every else ""
        raise LatencyUnreachableError(budget_s, predicted_min, original,
                                      f" with every one of the {len(choices)} prunable groups at its minimum size"
                                      f"{removable}")
    if allocation == "uniform":
        pos = _uniform_under(s, budget_s, constraints, total)
        return s.plan(*_fill(s, pos, NONE_GONE, s.predict(pos), budget_s, constraints, total))
    pos, gone = [len(cand) - 1 for cand in s.cands], NONE_GONE
    scale = original if original and original > 0 else 1.0
    predicted, macs = s.predict(pos), s.macs(pos)
    while True:
        over_time, over_macs = not predicted <= budget_s, not constraints.fits_macs(macs, total)
        if not (over_time or over_macs):
            break
        best = None  # (key, move, predicted, macs); key (has gain, ratio, gain or -cost); move ("group" | "block", i)

        def consider(move, p, m, lost):
            nonlocal best
            gain = (predicted - p) / scale * over_time + (macs - m) / total * over_macs
            key = (True, gain / lost if lost > 0 else math.inf, gain) if gain > 0 else (False, 0.0, -lost)
            if best is None or key > best[0]:
                best = (key, move, p, m)

        trials = s.predict_moves(pos, -1, gone) if over_time else None
        frozen = s.frozen(gone)
        for i in range(len(choices)):
            if pos[i] == 0 or i in frozen:
                continue
            consider(("group", i), float(trials[i]) if over_time else predicted,
                     s.macs(_moved(pos, i, -1), gone) if over_macs else macs, s.lost[i][pos[i] - 1] - s.lost[i][pos[i]])
        for b in range(len(s.branches)):
            if b not in gone and not s.covered(b, gone):
                after = gone | {b}
                consider(("block", b), s.predict(pos, after) if over_time else predicted,
                         s.macs(pos, after) if over_macs else macs, s.branch_lost(pos, b))
        if best is None:  # every group at its minimum: it fits (checked above) unless predict is not deterministic
            raise LatencyUnreachableError(budget_s, predicted, original, " (the latency model's predictions changed)")
        _, (kind, i), p, m = best
        if kind == "group":
            pos[i] -= 1
        else:  # its inner groups go to their minimum: the state then is one the all-minimum check covered
            gone = gone | {i}
            for j in s.branches[i].inner:
                pos[j] = 0
        exact = over_time and kind == "group"  # a block move also moved its inner groups: predict again
        predicted = p if exact else s.predict(pos, gone)
        macs = m if over_macs and kind == "group" else s.macs(pos, gone)
    return s.plan(*_fill(s, pos, gone, predicted, budget_s, constraints, total))


def _uniform_at(s: _State, ratio: float) -> list[int]:
    """Each group at its highest candidate count <= ratio x its units (at least its lowest)."""
    return [max(0, int(np.searchsorted(cand, ratio * len(c.units) + 1e-9, side="right")) - 1)
            for c, cand in zip(s.choices, s.cands)]


def _uniform_under(s: _State, budget_s, constraints, total, steps: int = 40) -> list[int]:
    """`_uniform_at` of the largest ratio predicted under both limits (the ratio 0 plan, every group at
    its minimum, fits: the caller checked)."""
    def fits(r):
        pos = _uniform_at(s, r)
        return s.predict(pos) <= budget_s and constraints.fits_macs(s.macs(pos), total)

    if fits(1.0):
        return _uniform_at(s, 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return _uniform_at(s, lo)


def _fill(s: _State, pos, gone, predicted, budget_s, constraints, total):
    """Up moves that keep the plan under both limits, best importance per second added first: a
    group one candidate up, or a removed block back (with what its inner groups keep). Returns
    (pos, gone)."""
    pos = list(pos)
    while True:
        options = []
        trials = s.predict_moves(pos, 1, gone)
        frozen = s.frozen(gone)
        for i in range(len(pos)):
            if pos[i] == len(s.cands[i]) - 1 or i in frozen:
                continue
            options.append((s.lost[i][pos[i]] - s.lost[i][pos[i] + 1], float(trials[i]), ("group", i)))
        for b in gone:
            back = gone - {b}
            options.append((s.branch_lost(pos, b), s.predict(pos, back), ("block", b)))
        ranked = []
        for regained, p, move in options:
            if p <= budget_s:
                added = p - predicted
                ranked.append(((regained / added if added > 0 else math.inf, regained), move, p))
        for _, (kind, i), p in sorted(ranked, key=lambda o: o[0], reverse=True):
            trial_pos, trial_gone = (_moved(pos, i, 1), gone) if kind == "group" else (pos, gone - {i})
            if constraints.fits_macs(s.macs(trial_pos, trial_gone), total):
                pos, gone, predicted = list(trial_pos), trial_gone, p
                break
        else:
            return pos, gone


def plan_counts(channels, plan: PruningPlan) -> dict[int, int]:
    """Kept units per prunable group of `plan` (absent groups: full), as a latency model reads them."""
    return {g.index: len(plan.keep[g.index]) if g.index in plan.keep else g.n_units for g in channels.prunable_groups}


def predict_plan(latency_model: LatencyModelLike, plan: PruningPlan, channels=None) -> float:
    """The predicted latency of `plan` (groups it does not list are full). With `channels`, the
    layers of the residual branches and concat inputs the plan removes count nothing; without, a
    plan that removes some is refused (its prediction would count them)."""
    kept = {g: len(k) for g, k in plan.keep.items()}
    if not (plan.remove_branches or plan.drop_concat_inputs):
        return predict_kept(latency_model, kept)
    if channels is None:
        raise ConfigError("predict_plan: this plan removes residual branches or concat inputs; pass the "
                          "analysis' channels so that their layers are left out of the prediction")
    return predict_kept(latency_model, kept, plan_removed_nodes(channels, plan))


# ------------------------------------------------------------------------------ measured retries


# Grow rounds of the measured fit the methods use (`fit_measured(grow=...)`): a slim model measured
# more than 3 % under its target gets up to three selections at a larger budget (the first
# extrapolated, the others bisecting once one overshoots), each kept if measured under the target.
GROW_ROUNDS = 3


@dataclass
class MeasuredFit:
    """The plan measured under the target (the first one, or the last grown one: `fit_measured`),
    and how it was found."""

    plan: PruningPlan
    measured_s: float
    predicted_budget_s: float  # the predicted budget the plan was selected at
    rounds: list[dict] = field(default_factory=list)  # {"budget_s", "predicted_s", "measured_s"} (+ flags)
    predicted_s: float | None = None  # the plan's predicted latency (when a latency model was given)


def _same_plan(a: PruningPlan, b: PruningPlan) -> bool:
    if a.keep.keys() != b.keep.keys() or any(not np.array_equal(np.asarray(a.keep[g]), np.asarray(b.keep[g]))
                                             for g in a.keep):
        return False
    return (a.remove_branches, a.drop_concat_inputs, a.fold_scales, a.scale_inputs) == \
        (b.remove_branches, b.drop_concat_inputs, b.fold_scales, b.scale_inputs)


def fit_measured(select: Callable[[float], PruningPlan], measure: Callable[[PruningPlan], float], target_s: float, *,
                 max_rounds: int = 6, predicted_budget: float | None = None,
                 latency_model: LatencyModelLike | None = None, min_shrink: float = 0.03,
                 channels=None, grow: int = 0, grow_slack: float = 0.03) -> MeasuredFit:
    """Select at a predicted budget, measure, shrink the budget until the measurement is <= target_s.

    Round r: `plan = select(budget)`; `measured = measure(plan)`; done if measured <= target_s.
    Otherwise the next budget is min(budget x (1 - min_shrink), base x target_s / measured), where
    base is the plan's predicted latency when `latency_model` is given (the plan may sit a step
    under its budget; scaling the budget would then pick the same plan again) and the budget
    otherwise; a measurement that is not finite shrinks by min_shrink only. The first budget is
    `predicted_budget`, or target_s. `channels`: the analysis' channels, which `predict_plan` needs
    for plans that remove residual blocks (`Constraints.blocks`).

    `grow` (rounds, default 0): a plan measured under the target by more than `grow_slack` of it
    leaves time unused (a latency model that overestimates; blocks removed whose layers cost less
    than predicted). Up to `grow` more selections at a larger budget, base x target_s / measured
    (at least budget x (1 + min_shrink)), each kept when it is measured under the target too; once
    one is measured over, the next rounds bisect between the largest budget measured under and the
    smallest measured over. A repeated plan before any overshoot, or a selection that fails, ends
    it; the last plan under the target is returned. So a grown result keeps more importance and is
    still measured under the target.

    Ends after `max_rounds` selections, when a selection repeats the previous plan (it was measured
    over already), or when `select` raises LatencyUnreachableError; then raises
    LatencyUnreachableError with `best_measured_s` (the smallest finite measurement, None if none),
    `best_plan` and `rounds`. Every round shrinks the budget, so it always ends.
    """
    if not (isinstance(target_s, (int, float)) and math.isfinite(target_s) and target_s > 0):
        raise ConfigError(f"target_s={target_s!r} must be a positive number of seconds")
    if max_rounds < 1 or not 0 < min_shrink < 1:
        raise ConfigError(f"max_rounds={max_rounds!r} must be >= 1 and min_shrink={min_shrink!r} in (0, 1)")
    original = latency_model.original_s if latency_model is not None else None
    budget = float(predicted_budget) if predicted_budget is not None else float(target_s)
    rounds: list[dict] = []
    previous = best_plan = cause = None
    best_measured = math.inf
    for _ in range(max_rounds):
        entry = {"budget_s": budget, "predicted_s": None, "measured_s": None}
        rounds.append(entry)
        try:
            plan = select(budget)
        except LatencyUnreachableError as e:
            entry["unreachable"], cause = True, e
            original = original if original is not None else e.original_s
            break
        predicted = predict_plan(latency_model, plan, channels) if latency_model is not None else None
        entry["predicted_s"] = predicted
        if previous is not None and _same_plan(plan, previous):
            entry["unchanged"] = True
            break
        previous = plan
        measured = float(measure(plan))
        entry["measured_s"] = measured
        if measured <= target_s:  # False for NaN
            return _grown(MeasuredFit(plan, measured, budget, rounds, predicted), select, measure, target_s,
                          latency_model, channels, grow, grow_slack, min_shrink)
        if measured < best_measured:
            best_measured, best_plan = measured, plan
        base = predicted if predicted is not None and predicted <= budget else budget
        ratio = target_s / measured if math.isfinite(measured) else 1.0
        budget = min(budget * (1 - min_shrink), base * ratio)
    seen = best_measured if math.isfinite(best_measured) else None
    if seen is None and cause is not None:
        raise LatencyUnreachableError(target_s, cause.best_s, original, " (no selection could be measured)",
                                      best_plan=None, rounds=rounds) from cause
    raise LatencyUnreachableError(
        target_s, seen if seen is not None else math.inf, original,
        f" after {len(rounds)} rounds of select-and-measure", measured=True, best_measured_s=seen,
        best_plan=best_plan, rounds=rounds) from cause


def _grown(fit: MeasuredFit, select, measure, target_s: float, latency_model, channels, grow: int,
           grow_slack: float, min_shrink: float) -> MeasuredFit:
    """`fit_measured`'s grow rounds (its docstring): larger budgets while the plan stays measured
    under the target; every round is recorded with "grow": True.

    Why a bracket: the first grow budget extrapolates the measured/predicted ratio, and a latency
    model that is off by a different factor for the larger plan (blocks taken back, a step crossed)
    overshoots it. Once one budget is measured over the target, the next rounds bisect between the
    largest budget measured under it and the smallest measured over it, instead of giving up."""
    over_budget = None  # the smallest budget whose plan was measured over the target
    for _ in range(grow):
        if fit.measured_s >= target_s * (1 - grow_slack) or not fit.measured_s > 0:
            break
        if over_budget is None:
            base = fit.predicted_s if fit.predicted_s is not None else fit.predicted_budget_s
            budget = max(fit.predicted_budget_s * (1 + min_shrink), base * target_s / fit.measured_s)
        else:
            budget = 0.5 * (fit.predicted_budget_s + over_budget)
            if budget <= fit.predicted_budget_s * (1 + 0.5 * min_shrink):
                break  # the bracket is narrower than a shrink step: nothing left to gain
        entry = {"budget_s": budget, "predicted_s": None, "measured_s": None, "grow": True}
        fit.rounds.append(entry)
        try:
            plan = select(budget)
        except LatencyUnreachableError:
            entry["unreachable"] = True
            break
        predicted = predict_plan(latency_model, plan, channels) if latency_model is not None else None
        entry["predicted_s"] = predicted
        if _same_plan(plan, fit.plan):
            entry["unchanged"] = True
            if over_budget is None:
                break
            fit.predicted_budget_s = budget  # the same plan up to here: the boundary lies above
            continue
        measured = float(measure(plan))
        entry["measured_s"] = measured
        if not measured <= target_s:
            over_budget = budget
            continue
        fit = MeasuredFit(plan, measured, budget, fit.rounds, predicted)
    return fit


# ------------------------------------------------------------------------------ round_to="auto"


def snap_to_steps(channels, cost, scores: dict[int, np.ndarray], plan: PruningPlan, latency_model: LatencyModelLike,
                  constraints: Constraints) -> PruningPlan:
    """`plan` (a FLOPs-target selection, e.g. `selection.select`'s) with every group's count moved
    onto a latency step of `latency_model` (round_to="auto").

    The rule, per group with k kept units and candidates C (module docstring: the model's edges
    rounded down to allowed counts, the full count, the rule minimum):
      lo = the largest candidate <= k (the rule minimum if none), hi = the smallest candidate >= k.
    On a staircase, hi costs the same time as k and keeps more; lo saves time and keeps less.
    1. Every group starts at lo (MACs only fall, so it fits when `plan` did).
    2. Among the groups with hi > lo whose raise to hi still fits `constraints.fits_macs`, the one
       adding the fewest predicted seconds per MAC added is raised (a raise adding no time first;
       ties: more importance regained); repeat until no raise fits. A raise that does not fit now
       never will (MACs only grow), so each group is tried until raised or dropped: it ends.
    Each result count is lo or hi; the MACs fit; with a monotone staircase model the predicted
    latency is at most that of `plan`. Kept units are the most important by `scores`, as in `select`.
    """
    choices = _choices(channels, scores, constraints)
    if not choices:
        return PruningPlan()
    s = _State(channels, cost, scores, choices, latency_model)
    total = cost.total_macs
    pos, hi = [], []
    for c, cand in zip(choices, s.cands):
        k = len(plan.keep[c.index]) if c.index in plan.keep else len(c.units)
        pos.append(max(int(np.searchsorted(cand, k, side="right")) - 1, 0))
        hi.append(min(int(np.searchsorted(cand, k, side="left")), len(cand) - 1))
    macs = s.macs(pos)
    if not constraints.fits_macs(macs, total):
        raise TargetUnreachableError(constraints.flops, macs / total,
                                     " (the plan to snap does not fit, even with every group snapped down)")
    pending = {i for i in range(len(choices)) if hi[i] > pos[i]}
    predicted = s.predict(pos)
    while pending:
        best = None
        for i in sorted(pending):
            trial = list(pos)
            trial[i] = hi[i]
            m = s.macs(trial)
            if not constraints.fits_macs(m, total):
                pending.discard(i)
                continue
            p = s.predict(trial)
            added_time, added_macs = p - predicted, m - macs
            per_mac = -math.inf if added_time <= 0 else (added_time / added_macs if added_macs > 0 else math.inf)
            key = (per_mac, -(s.lost[i][pos[i]] - s.lost[i][hi[i]]))
            if best is None or key < best[0]:
                best = (key, i, p, m)
        if best is None:
            break
        _, i, predicted, macs = best
        pos[i] = hi[i]
        pending.discard(i)
    return s.plan(pos)


def allocate_for_speed(channels, cost, scores: dict[int, np.ndarray], constraints: Constraints,
                       latency_model: LatencyModelLike, *, per_mac: float = 0.0,
                       per_importance: float = 1.0) -> PruningPlan:
    """A FLOPs-target plan whose time falls where the latency model says it is cheapest
    (round_to="auto"'s candidates beside `snap_to_steps`).

    The down moves of `select_under_latency` (one group to its next lower candidate), ranked by

        predicted seconds saved / (MACs removed ** per_mac * importance lost ** per_importance)

    (seconds and MACs as fractions of the original's), until the MACs fit `constraints`; then the
    fill (up moves that add no predicted time and keep the MACs fitting). So the MACs land at the
    target, as a FLOPs target asks, and the time the model loses is taken where it is cheapest:
    with the defaults (time-first) cheapest in importance, so layers that cost time without MACs
    (memory-bound ones, slow channel counts) lose channels before layers that run at full speed;
    with ``per_mac=1`` time is bought per MAC spent of the budget, which is the knapsack ratio for
    the most time saved at a fixed MACs cut (``per_importance=0``: importance only orders the units
    inside a group). Moves that save no predicted time come last, the least importance first.
    It keeps less importance than the FLOPs ranking; `auto_round` says when it is taken.
    """
    choices = _choices(channels, scores, constraints)
    if not choices:
        return PruningPlan()
    s = _State(channels, cost, scores, choices, latency_model)
    total, original = cost.total_macs, latency_model.original_s
    macs_min = s.macs([0] * len(choices))
    if not constraints.fits_macs(macs_min, total):
        raise TargetUnreachableError(constraints.flops, macs_min / total,
                                     f" ({len(choices)} prunable groups; the rest is fixed by boundaries)")
    pos = [len(cand) - 1 for cand in s.cands]
    predicted, macs = s.predict(pos), s.macs(pos)
    while not constraints.fits_macs(macs, total):
        trials = s.predict_moves(pos, -1)
        removed = s.macs_removed_by_moves(pos) if per_mac else None
        best = None
        for i in range(len(choices)):
            if pos[i] == 0:
                continue
            gain = (predicted - float(trials[i])) / original
            lost = s.lost[i][pos[i] - 1] - s.lost[i][pos[i]]
            if gain > 0:
                price = lost ** per_importance if per_importance else 1.0
                if per_mac:
                    price *= max(removed[i] / total, 1e-15) ** per_mac
                key = (True, gain / price if price > 0 else math.inf, gain)
            else:
                key = (False, 0.0, -lost)
            if best is None or key > best[0]:
                best = (key, i)
        _, i = best  # some group can move: the all-minimum state fits (checked above)
        pos[i] -= 1
        predicted, macs = float(trials[i]), s.macs(pos)
    return s.plan(*_fill(s, pos, NONE_GONE, predicted, predicted, constraints, total))


# round_to="auto"'s candidates beside the snapped FLOPs ranking, most importance-minded first:
# (name, per_mac, per_importance) of `allocate_for_speed`
SPEED_PLANS = (("time-first", 0.0, 1.0), ("per-mac", 1.0, 1.0), ("per-mac-half", 1.0, 0.5),
               ("per-mac-time", 1.0, 0.0))
# A candidate is "efficient" when its predicted time falls at least in proportion to its MACs
EFFICIENT = 1.0
# The speed candidates keep at least this fraction of every group (or the user's min_ratio if
# higher): priced per MAC, a slow group otherwise goes to one channel (densenet121 at flops=0.5:
# 1 of 256), a network no fine-tune recovers. Predicted efficiency of the per-MAC plan on this
# CPU (docs/benchmarks.md, pass 6): no floor 1.050 / 1.004 (regnet_y_800mf / densenet121), 0.1:
# 1.039 / 1.008, 0.2: 1.012 / 0.985 (measured 1.043 / 0.948: densenet121 just under the goal).
SPEED_MIN_RATIO = 0.1


def importance_lost(channels, scores: dict[int, np.ndarray], plan: PruningPlan) -> float:
    """Per-group-normalised importance (`selection.normalize`) of the units `plan` removes, summed
    over groups: the measure every latency selection here trades against time."""
    out = 0.0
    for g in channels.prunable_groups:
        if g.index in plan.keep:
            norm = normalize(np.asarray(scores[g.index], dtype=np.float64))
            out += float(norm.sum() - norm[np.asarray(plan.keep[g.index], dtype=np.int64)].sum())
    return out


def auto_round(channels, cost, scores: dict[int, np.ndarray], plan: PruningPlan, latency_model: LatencyModelLike,
               constraints: Constraints) -> tuple[PruningPlan, dict]:
    """round_to="auto" for a FLOPs target. Candidates, all within the MACs budget, from the most
    importance-minded to the most time-minded: `snap_to_steps(plan)` (the FLOPs ranking's allocation
    on step edges), then the `SPEED_PLANS` allocations (each group kept at `SPEED_MIN_RATIO` at
    least; skipped when that floor does not fit the MACs budget). Each gets a predicted efficiency (MACs kept /
    predicted latency, both as fractions of the original); the first at least `EFFICIENT` (its time
    falls in proportion to its MACs or faster) is taken, and the later ones are not built. If none
    is, the most efficient one (ties: the earlier). Returns the plan and what was compared (with
    each candidate's `importance_lost`, so the price of the speed is in the report)."""
    total, original = cost.total_macs, latency_model.original_s
    floored = dataclasses.replace(constraints, min_ratio=max(constraints.min_ratio, SPEED_MIN_RATIO))
    makers = [("snapped", lambda: snap_to_steps(channels, cost, scores, plan, latency_model, constraints))]
    makers += [(name, functools.partial(allocate_for_speed, channels, cost, scores, floored, latency_model,
                                        per_mac=per_mac, per_importance=per_importance))
               for name, per_mac, per_importance in SPEED_PLANS]
    compared, best = {}, None
    for name, make in makers:
        try:
            candidate = make()
        except TargetUnreachableError:  # the speed floor leaves too many MACs: every speed plan
            break  # shares it, so none of them can be built
        macs = cost.macs(channels.keep_roots(candidate.keep))
        predicted = predict_plan(latency_model, candidate)
        efficiency = (macs / total) / (predicted / original) if predicted > 0 else 0.0
        compared[name] = {"macs_fraction": macs / total, "predicted_fraction": predicted / original,
                          "predicted_efficiency": efficiency,
                          "importance_lost": importance_lost(channels, scores, candidate)}
        if best is None or efficiency > best[0] + 1e-9:
            best = (efficiency, name, candidate)
        if efficiency >= EFFICIENT:
            best = (efficiency, name, candidate)
            break
    compared["chosen"] = best[1]
    return best[2], compared


__all__ = ["ALLOCATIONS", "Branch", "EFFICIENT", "SPEED_MIN_RATIO", "SPEED_PLANS", "LatencyModelLike", "LatencyUnreachableError", "MeasuredFit",
           "allocate_for_speed", "auto_round", "fit_measured", "importance_lost",
           "plan_counts", "predict_kept", "predict_plan", "removable_branches", "select_under_latency", "snap_to_steps"]
