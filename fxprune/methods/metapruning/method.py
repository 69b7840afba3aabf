"""MetaPruning (Liu et al., ICCV 2019) on fxprune's channel groups: PruningNet + evolutionary search.

1. **Encoding** (`passes.width_encoding`): one width variable per prunable channel group (residual
   adds already make a stage's outputs one group), choices = ratios 0.10 ... 1.00 step 0.03.
2. **PruningNet** (`passes.pruningnet`): an MLP per conv/linear weight from the ratios of its
   groups to the full-size weight, cropped; per-width BatchNorm banks; trained with the harness on
   a new random structure per mini-batch (label smoothing 0.1, SGD momentum 0.9, LR decayed
   linearly to 0 — the authors' ResNet-50 defaults: lr 0.1, weight decay 1e-4, 32 epochs).
3. **Search** (`fxprune.evolution`): population 50, 20 generations, top-10 parents, 25 mutations
   (p = 0.1 per gene), 25 crossovers, random fill; a hard constraint by rejection on MACs (exact
   recount of the graph), optionally params and latency. The latency of a genome is predicted by
   the package's one latency model (`fxprune.latency_model.profile_latency`, profiled before the
   PruningNet trains, on the device / batch / dtype / memory format `compress` measures on, or
   reused from `latency_model=`), reading the genome as kept units per group; the limit is
   `latency=` x the measured original, or `latency_ms=`; a limit even the smallest widths are
   predicted over raises `LatencyUnreachableError`. Each candidate gets its weights from the
   PruningNet, BatchNorm statistics recalibrated on `calib_batches` training batches, and is
   scored by accuracy (ties: loss) on a held-out split of the *training* data (`holdout` of it,
   or `search_data=`), never a test set. With a latency limit the chosen structure's slim model is
   then *measured* end to end (side by side with the original for `latency=`); measured over the
   limit, the predicted limit shrinks and the best-scored structure the search evaluated under it
   is taken instead (`_measured_choice`, `fit_measured`'s loop), until one is measured under or
   `LatencyUnreachableError` gives the best measured value.
4. **Output**: the best structure's PruningNet weights (recalibrated) are written into the
   private model copy at the kept positions (the first k channels of each group) and the plan
   keeps those; the core rewrite then builds the slim module. `final="finetune"` trains the slim
   network further, `final="scratch"` re-initialises and trains it (the authors' final step),
   both with the harness before the write-back. The details hold the widths, the search history
   (per generation best/mean accuracy and MACs ratio) and, with a latency limit, the same
   ``latency`` entry as every method's (`methods.latency_target.latency_details`: predicted and
   measured before and after, the target; the final model measured end to end as the latency
   model was) plus the chosen genome's predicted seconds as the search saw them.

Under torch.distributed (``torchrun``; the script calls `fxprune.train.init_distributed()` and
passes a DataLoader with a DistributedSampler): every rank uses rank 0's seed, so the split, the
PruningNet's initial values, the structure sampled per mini-batch and the search's draws agree;
the PruningNet trains under DDP on each rank's shard of the training part (gradients averaged,
BN banks included); the held-out batches and the BN-recalibration batches are the whole data on
every rank (`unsharded`), so a candidate scores the same on any rank (and as without torchrun).
Each generation is scored in parts, rank r taking candidates r, r + world, ..., and gathered in
order (`fxprune.distributed.map_over_ranks`): every rank holds the same scores and makes the same
choices. The final training runs under DDP; rank 0's weights are kept. Latency is profiled and
measured on rank 0. details["search"] adds ``ranks`` and ``scored_by_this_rank``.

Example::

    >>> slim = fxprune.compress(model, "metapruning", x, flops=0.5, data=loader,
    ...                         options=dict(epochs=4, population=16, generations=8, calib_batches=8))
    >>> slim.fxprune_report.details["search"]["history"][-1]["pool_best_accuracy"]
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from fxprune.analysis import ModelAnalysis, analyze
from fxprune.constraints import Constraints, MeasureOn
from fxprune.distributed import (
    map_over_ranks,
    rank0_value,
    rank_and_world,
    sync_from_rank0,
    with_rank0_seed,
)
from fxprune.errors import ConfigError, LatencyUnreachableError, TargetUnreachableError
from fxprune.latency_model import LatencyModel, profile_latency
from fxprune.latency_model.profile import _default_dtype, batched, make_key, settings_of
from fxprune.passes.plan import PruningPlan
from fxprune.passes.pruningnet import PruningNet, reinitialize, write_back
from fxprune.passes.width_encoding import DEFAULT_RATIOS, build_encoding
from fxprune.train import (
    History,
    TrainConfig,
    TrainingError,
    _split_batch,
    evaluate,
    recalibrate_bn,
    train,
)

from ..base import MethodContext, MethodResult
from ..latency_selection import fit_measured
from ..latency_target import latency_details, slim_latency
from .evolution import EvolutionConfig, evolve, repair

FINAL = ("none", "finetune", "scratch")
SAMPLING = ("uniform", "feasible")


@dataclass
class MetaPruningOptions:
    # width space
    ratios: tuple = DEFAULT_RATIOS
    # PruningNet and its training (authors' ResNet-50 defaults)
    hidden: int = 32
    bn_banks: bool = True
    epochs: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    pruningnet: Any = None  # a trained PruningNet to reuse (see `pretrain`): skips training
    # train the PruningNet again (another `epochs`, the LR schedule restarted) until sampled feasible
    # structures reach this held-out accuracy, at most `pruningnet_max_rounds` rounds in all
    pruningnet_until: float | None = None
    pruningnet_max_rounds: int = 3
    pruningnet_probe: int = 4  # sampled feasible structures per check (per target with pretrain's flops=)
    # the structure of each training mini-batch: "uniform" (every gene uniform, the authors') or
    # "feasible" (a uniform genome stepped down until it meets the MACs / params / latency limits:
    # the structures the search scores; see `pruningnet_sampler`)
    pruningnet_sampling: str = "uniform"
    # evolutionary search (authors' defaults)
    population: int = 50
    generations: int = 20
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    init_ratio_range: tuple | None = None  # e.g. (0.46, 0.79), the authors' ResNet initial range
    # candidate scoring
    holdout: float = 0.1  # fraction of the training data held out for scoring
    search_data: Iterable | None = None  # explicit held-out batches (then all of `data` trains)
    calib_batches: int = 100  # training batches to recalibrate BatchNorm statistics (authors: 100)
    eval_batches: int | None = None  # held-out batches scored per candidate (None: all)
    # constraints besides compress(flops=, latency=)
    params: float | None = None  # at most this fraction of the original parameters
    min_flops: float | None = None  # at least this fraction of the original MACs (authors' ResNet band)
    # a LatencyModel to reuse with a latency limit (`fxprune.latency_model.profile_latency` of the
    # same model, with the device / batch / dtype / channels_last / compile compress measures with)
    latency_model: Any = None
    latency_rounds: int | None = None  # profile_latency's rounds (None: its default, shared with the cache)
    # the found structure
    final: str = "none"  # "none" (PruningNet weights), "finetune", "scratch"
    final_epochs: int | None = None  # default: 128 (scratch, authors) / 16 (finetune)
    final_lr: float | None = None  # default: 0.1 (scratch) / 0.01 (finetune); decayed linearly
    final_data: Iterable | None = None  # default: the training split
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        if self.final not in FINAL:
            raise ConfigError(f"unknown metapruning final={self.final!r}: choose from {', '.join(FINAL)}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout={self.holdout} must be a fraction in (0, 1)")
        if self.calib_batches < 1 or (self.eval_batches is not None and self.eval_batches < 1):
            raise ConfigError("calib_batches and eval_batches must be >= 1")
        if self.epochs < 1 or self.lr <= 0:
            raise ConfigError("epochs must be >= 1 and lr > 0")
        for name in ("params", "min_flops"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ConfigError(f"{name}={v} must be a fraction in (0, 1]")
        if self.latency_model is not None and not isinstance(self.latency_model, LatencyModel):
            raise ConfigError(f"latency_model must be a fxprune.latency_model.LatencyModel (from profile_latency), "
                              f"got {type(self.latency_model).__name__}")
        if self.pruningnet_until is not None and not 0 < self.pruningnet_until <= 1:
            raise ConfigError(f"pruningnet_until={self.pruningnet_until} must be an accuracy in (0, 1] or None")
        if self.pruningnet_max_rounds < 1 or self.pruningnet_probe < 1:
            raise ConfigError("pruningnet_max_rounds and pruningnet_probe must be >= 1")
        if self.pruningnet_sampling not in SAMPLING:
            raise ConfigError(f"unknown pruningnet_sampling={self.pruningnet_sampling!r}: choose from "
                              f"{', '.join(SAMPLING)}")
        r = self.latency_rounds
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ConfigError(f"latency_rounds must be an integer >= 1 or None, got {r!r}")
        self.evolution()  # validates the search settings

    def evolution(self) -> EvolutionConfig:
        return EvolutionConfig(self.population, self.generations, self.parents, self.mutations, self.crossovers,
                               self.mutation_prob, self.init_ratio_range, seed=self.seed)


# -- data -----------------------------------------------------------------------------------------
def split_data(data: Iterable, holdout: float, seed: int) -> tuple:
    """(training batches, held-out batches): a seeded split of a DataLoader's dataset, else of the
    batches themselves (the last `holdout` of them).

    A DataLoader sharded by a DistributedSampler (torchrun) keeps its training part sharded (a
    DistributedSampler over the training subset, with the same replicas, rank, shuffle and seed);
    the held-out part is whole on every rank, so a candidate's score does not depend on the rank
    that scored it. `seed` must be the same on every rank (`with_rank0_seed`): it draws the split."""
    if isinstance(data, DataLoader) and data.batch_size is not None and not isinstance(data.dataset, IterableDataset):
        n = len(data.dataset)
        n_hold = max(1, int(round(holdout * n)))
        if n - n_hold < 1:
            raise TrainingError(f"the training data has {n} samples: too few to hold out {holdout:.0%} for scoring")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        training, held = Subset(data.dataset, perm[n_hold:]), Subset(data.dataset, perm[:n_hold])
        sampler = data.sampler
        if isinstance(sampler, DistributedSampler):
            shard = DistributedSampler(training, num_replicas=sampler.num_replicas, rank=sampler.rank,
                                       shuffle=sampler.shuffle, seed=sampler.seed, drop_last=sampler.drop_last)
            train_loader = DataLoader(training, sampler=shard, **_loader_settings(data))
        else:
            train_loader = _whole(data, training, isinstance(sampler, RandomSampler), seed)
        return train_loader, _whole(data, held, False, seed)
    batches = list(data)
    if len(batches) < 2:
        raise TrainingError(f"metapruning needs at least 2 training batches (one is held out for scoring), got "
                            f"{len(batches)}: pass more data or search_data=")
    n_hold = min(len(batches) - 1, max(1, int(round(holdout * len(batches)))))
    return batches[:-n_hold], batches[-n_hold:]


def _loader_settings(data: DataLoader) -> dict:
    """What a loader over another part of `data`'s dataset keeps of `data`."""
    return dict(batch_size=data.batch_size, collate_fn=data.collate_fn, num_workers=data.num_workers,
                pin_memory=data.pin_memory, drop_last=data.drop_last)


def _whole(data: DataLoader, dataset, shuffle: bool, seed: int) -> DataLoader:
    """A loader over all of `dataset` with `data`'s settings, shuffled by a `seed`ed generator."""
    return DataLoader(dataset, shuffle=shuffle, generator=torch.Generator().manual_seed(seed) if shuffle else None,
                      **_loader_settings(data))


def unsharded(data: Iterable, seed: int) -> Iterable:
    """`data`, or when a DistributedSampler shards it, a loader over its whole dataset in the order
    one process would read it (shuffled as the sampler shuffles, by a `seed`ed generator): the
    batches that recalibrate and score the candidates are then the same on every rank, and the
    same as without torchrun."""
    sampler = getattr(data, "sampler", None)
    if not isinstance(data, DataLoader) or not isinstance(sampler, DistributedSampler):
        return data
    return _whole(data, data.dataset, sampler.shuffle, seed)


def _first(data: Iterable, n: int | None, seed: int):
    """The first `n` batches, in the same order every time (a shuffling loader is re-seeded)."""
    generator = getattr(data, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    for i, batch in enumerate(data):
        if n is not None and i >= n:
            return
        yield batch


def _labelled(data, n, seed, targets_from):
    for batch in _first(data, n, seed):
        yield _split_batch(batch, targets_from)


def _inputs_only(data, n, seed):
    for batch in _first(data, n, seed):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield x, None


# -- PruningNet -----------------------------------------------------------------------------------
def _encoding(channels, opts: MetaPruningOptions, selection: dict):
    return build_encoding(channels, opts.ratios, round_to=selection.get("round_to"),
                          min_channels=selection.get("min_channels", 1), min_ratio=selection.get("min_ratio", 0.0))


def train_pruningnet(net: PruningNet, data: Iterable, opts: MetaPruningOptions, targets_from=None):
    """Train `net` in place with the harness, a random structure per mini-batch; returns the History."""
    net.rng = np.random.default_rng(rank0_value(opts.seed))  # under DDP: the same structure on every rank
    cfg = TrainConfig(epochs=opts.epochs, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay,
                      schedule="triangular", peak_at=0.0, label_smoothing=opts.label_smoothing, seed=opts.seed,
                      progress=opts.progress)
    history = train(net, data, cfg, targets_from=targets_from)
    net.eval()
    return history


class _FeasibleSampler:
    """rng -> a genome meeting one of `limits` (see `pruningnet_sampler`); a class, not a closure,
    so the limits a PruningNet trained under stay readable on it (`net.sampler.limits`)."""

    def __init__(self, encoding, limits: list):
        self.encoding, self.limits = encoding, list(limits)

    def __call__(self, rng: np.random.Generator) -> tuple:
        limit = self.limits[int(rng.integers(len(self.limits)))]
        genome = repair(self.encoding.random(rng), limit, rng)
        return self.encoding.smallest() if genome is None else genome


def pruningnet_sampler(encoding, limits: list) -> Callable:
    """rng -> the genome of a training mini-batch under `pruningnet_sampling="feasible"`: a
    uniformly random genome stepped down (`repair`: a random gene at a time, by 10 % of its value
    and at least one choice) until it meets one of `limits` (feasibility checks, one drawn per
    mini-batch), i.e. the structures the search's random fill and the rounds' check draw. Lower
    limits (`min_flops`) are left out of `limits` by the callers: a walk down can step past a
    narrow band.

    Why (a deviation from the authors, who draw every gene uniformly): their targets (ResNet-50 at
    ~50 % of the FLOPs, MobileNets at 25-75 %) lie where uniform draws already land; a uniform
    draw of ResNet-20 keeps 29 % of the MACs (median), so only 36 % of the draws are under 25 % and
    1.7 % under 10 %: uniformly trained weights mostly serve structures the search never scores,
    and the ones it scores at 10 % stay nearly untrained (docs/results.md, MetaPruning)."""
    if not limits:
        raise ConfigError("pruningnet_sampler needs at least one feasibility check (the MACs limits)")
    return _FeasibleSampler(encoding, limits)


def _probe(scorer, encoding, feasible, n: int, seed: int) -> list:
    """Held-out accuracies of `n` sampled structures that meet `feasible` (the same ones every round)."""
    return [scorer(g)["accuracy"] for g in sampled_structures(encoding, feasible, n, seed)]


def _train_until(net, scorer, encoding, probe_sets: list, data, opts: MetaPruningOptions, targets_from):
    """Train the PruningNet in rounds of `epochs` until the `pruningnet_probe` sampled feasible
    structures of every probe set reach `pruningnet_until` mean held-out accuracy (or
    `pruningnet_max_rounds` rounds): the search can only rank structures as well as the
    PruningNet's weights let them score. `probe_sets` is [(MACs target or None, feasibility)].
    Returns (per-epoch history, per-round held-out accuracy: ``heldout_accuracy`` is the lowest
    per-set mean, the one the check reads; ``min`` / ``median`` over every probed structure;
    ``per_target`` the accuracies of each set; ``seconds`` the training time so far); one round
    and no check without a target."""
    history, rounds, seconds = [], [], 0.0
    for r in range(opts.pruningnet_max_rounds if opts.pruningnet_until is not None else 1):
        t0 = time.perf_counter()
        history += train_pruningnet(net, data, dataclasses.replace(opts, seed=opts.seed + r), targets_from).epochs
        seconds += time.perf_counter() - t0
        if opts.pruningnet_until is None:
            break
        per_target = [{"flops": flops, "accuracy": _probe(scorer, encoding, feasible, opts.pruningnet_probe, opts.seed)}
                      for flops, feasible in probe_sets]
        every = [a for t in per_target for a in t["accuracy"]]
        accuracy = min((float(np.mean(t["accuracy"])) if t["accuracy"] else 0.0) for t in per_target)
        rounds.append({"epochs": (r + 1) * opts.epochs, "heldout_accuracy": accuracy, "structures": len(every),
                       "min": min(every, default=0.0), "median": float(np.median(every)) if every else 0.0,
                       "per_target": per_target, "seconds": seconds})
        if accuracy >= opts.pruningnet_until:
            break
    return history, rounds


def sampled_structures(encoding, feasible, n: int, seed: int) -> list:
    """`n` random genomes that meet the constraint (random widths stepped down until they do)."""
    rng, found = np.random.default_rng(seed + 7919), []
    for _ in range(20 * n):
        if len(found) >= n:
            break
        g = repair(encoding.random(rng), feasible, rng)
        if g is not None and g not in found:
            found.append(g)
    return found


def _pretrain_targets(flops, band, opts: MetaPruningOptions) -> list:
    """`pretrain`'s flops= as a list of fractions (empty: no target), validated with `band`."""
    if flops is None:
        targets = []
    elif isinstance(flops, (int, float)) and not isinstance(flops, bool):
        targets = [float(flops)]
    else:
        targets = [float(t) for t in flops]
    if any(not 0 < t <= 1 for t in targets):
        raise ConfigError(f"pretrain flops={flops!r}: give MACs fractions in (0, 1], e.g. flops=(0.25, 0.1)")
    if band is not None and not 0 <= band < 1:
        raise ConfigError(f"pretrain band={band!r}: give a fraction in [0, 1) (the search's min_flops = (1 - band) x "
                          "target), or None")
    if opts.pruningnet_sampling == "feasible" and not targets:
        raise ConfigError('pruningnet_sampling="feasible" in pretrain needs flops= (the targets it will be searched '
                          'at, e.g. flops=(0.25, 0.1))')
    return targets


def _pretrain_limits(encoding, cost, targets: list, band: float | None, opts: MetaPruningOptions):
    """(the MACs limit of each target: what feasible sampling trains under, [(target, the limit
    within its band)]: what the rounds' check probes); with no target the check takes any
    structure. Each target is checked reachable first: a PruningNet for an unreachable one would
    train on infeasible structures and score none."""
    unlimited = dataclasses.replace(opts, min_flops=None, params=None)
    below, probe_sets = [], []
    for t in targets:
        limit = _GenomeLimits(encoding, cost, Constraints(flops=t), unlimited)
        limit.check_reachable(t)
        banded = limit if band is None else _GenomeLimits(encoding, cost, Constraints(flops=t),
                                                         dataclasses.replace(unlimited, min_flops=(1 - band) * t))
        below.append(limit)
        probe_sets.append((t, banded))
    return below, probe_sets or [(None, lambda _g: True)]


def pretrain(model: torch.nn.Module, example_inputs, data: Iterable, options: dict | MetaPruningOptions | None = None,
             *, flops: float | Iterable[float] | None = None, band: float | None = None,
             round_to: int | None = None, min_channels: int = 1, min_ratio: float = 0.0) -> PruningNet:
    """Train a PruningNet for `model` once, to reuse in several searches (``options={"pruningnet": net}``).

    It trains on the same split `compress` would make (same `holdout` and `seed`), so the held-out
    batches stay unseen, and in rounds until `pruningnet_until` as `compress` does. `flops` names
    the MACs targets it will be searched at (a fraction or several): the check then probes
    `pruningnet_probe` structures feasible at each target (at most the target, at least
    ``(1 - band)`` x it with `band`, as the search's band) and needs every target's mean; without
    it any structure counts. ``pruningnet_sampling="feasible"`` trains on structures under one of
    the targets (a random one per mini-batch). `net.history` holds the epochs, `net.heldout` the
    per-round held-out accuracy.
    """

    opts = options if isinstance(options, MetaPruningOptions) else MetaPruningOptions(**(options or {}))
    opts = with_rank0_seed(opts)  # the same split on every rank
    targets = _pretrain_targets(flops, band, opts)
    analysis = analyze(copy.deepcopy(model), example_inputs)
    encoding = _encoding(analysis.channels, opts, {"round_to": round_to, "min_channels": min_channels,
                                                   "min_ratio": min_ratio})
    below, probe_sets = _pretrain_limits(encoding, analysis.cost, targets, band, opts)  # unreachable: fails here
    if opts.search_data is not None:
        train_data, heldout = data, opts.search_data
    else:
        train_data, heldout = split_data(data, opts.holdout, opts.seed)
    net = PruningNet(analysis.channels, encoding, opts.hidden, opts.bn_banks, opts.seed)
    scorer = _Scorer(net, train_data, heldout, opts, model)
    if opts.pruningnet_sampling == "feasible":
        net.sampler = pruningnet_sampler(encoding, below)
    epochs, net.heldout = _train_until(net, scorer, encoding, probe_sets, train_data, opts, model)
    net.history = History(epochs=epochs)
    return net


# -- constraints and scoring ----------------------------------------------------------------------
def genome_kept(encoding, genome) -> dict:
    """{prunable group index: kept units} of `genome`: what `LatencyModel.predict` reads."""
    return dict(zip(encoding.groups, encoding.counts(genome)))


_REUSE_SETTINGS = ("device", "dtype", "batch", "channels_last", "compile", "inputs")


def _head(n_units: dict, n: int = 6) -> str:
    items = sorted(n_units.items())
    return "{" + ", ".join(f"{g}: {u}" for g, u in items[:n]) + (", ...}" if len(items) > n else "}")


def _reused_latency_model(latency_model: LatencyModel, analysis, on: MeasureOn) -> LatencyModel:
    """`latency_model` if it was profiled on this analysed model with the settings `on` measures
    with (its key's model digest, prunable groups, device, dtype, batch, memory format, compile and
    input shapes), else a ConfigError naming what differs."""
    channels = analysis.channels
    s = settings_of(**asdict(on), threads=None, rounds=1, points=2,
                    default_dtype=_default_dtype(channels.gm, analysis.inputs))
    want = make_key(channels, batched(analysis.inputs, s.batch), s, None)
    key = latency_model.key if isinstance(latency_model.key, dict) else {}
    n_units = {g.index: g.n_units for g in channels.prunable_groups}
    if key.get("model") != want["model"] or latency_model.n_units != n_units:
        raise ConfigError(
            f"latency_model was profiled on another model (or another analysis of it: other ignore= / leaf_modules=):"
            f" its prunable groups (index: units) are {_head(latency_model.n_units)}, this model's {_head(n_units)}"
            f"{' (same groups, another layout)' if latency_model.n_units == n_units else ''};"
            " profile it with fxprune.latency_model.profile_latency(fxprune.analyze(model, x), ...) of this model")
    differ = [f"{k}={key.get(k)!r} (compress measures with {want[k]!r})" for k in _REUSE_SETTINGS
              if key.get(k) != want[k]]
    if differ:
        raise ConfigError(f"latency_model was profiled with {', '.join(differ)}: profile it with the device=, batch=, "
                          "dtype=, channels_last=, compile= given to compress (or give compress those of the profile)")
    return latency_model


def _latency_model(analysis, opts: MetaPruningOptions, on: MeasureOn) -> LatencyModel:
    """The reused `latency_model=` (checked), else the model profiled now (or read from the cache)."""
    if opts.latency_model is not None:
        return rank0_value(_reused_latency_model(opts.latency_model, analysis, on))  # one model for every rank
    rounds = {} if opts.latency_rounds is None else {"rounds": opts.latency_rounds}
    return profile_latency(analysis, **asdict(on), **rounds)


class _GenomeLimits:
    """MACs (and params, latency) of a genome against the `Constraints`; cheap checks first.
    A latency limit (seconds) is checked on `latency_model`'s prediction of the genome's kept units."""

    def __init__(self, encoding, cost, constraints: Constraints, opts: MetaPruningOptions,
                 latency_model: LatencyModel | None = None, latency_s: float | None = None):
        self.encoding, self.cost, self.latency_model, self.latency = encoding, cost, latency_model, latency_s
        self.max_macs = constraints.macs_limit(cost.total_macs)
        self.min_macs = None if opts.min_flops is None else opts.min_flops * cost.total_macs
        self.max_params = constraints.params_limit(cost.total_params)

    def predicted_s(self, genome) -> float:
        return float(self.latency_model.predict(genome_kept(self.encoding, genome)))

    def __call__(self, genome) -> bool:
        return self.within(genome, self.latency)

    def within(self, genome, latency_s: float | None) -> bool:
        """The MACs and params limits, and a predicted latency of at most `latency_s` (None: any)."""
        macs = self.encoding.macs(self.cost, genome)
        if macs > self.max_macs or (self.min_macs is not None and macs < self.min_macs):
            return False
        if self.max_params is not None and self.encoding.params(self.cost, genome) > self.max_params:
            return False
        return latency_s is None or self.predicted_s(genome) <= latency_s

    def check_reachable(self, flops: float) -> None:
        small = self.encoding.smallest()
        macs = self.encoding.macs(self.cost, small)
        if macs > self.max_macs:
            raise TargetUnreachableError(flops, macs / self.cost.total_macs,
                                         f" ({len(self.encoding)} width variables at their smallest ratio)")
        if self.max_params is not None and self.encoding.params(self.cost, small) > self.max_params:
            raise ConfigError(f"params={self.max_params / self.cost.total_params:.4f} is unreachable: the smallest "
                              f"widths keep {self.encoding.params(self.cost, small) / self.cost.total_params:.4f} "
                              "of the parameters")
        if self.latency is not None and self.predicted_s(small) > self.latency:
            raise LatencyUnreachableError(self.latency, self.predicted_s(small), self.latency_model.original_s,
                                          " (every width at its smallest ratio)", measured=False)
        if self.min_macs is not None and self.encoding.macs(self.cost, self.encoding.full()) < self.min_macs:
            raise ConfigError(f"min_flops={self.min_macs / self.cost.total_macs:.4f} is above what the full model has")


class _Scorer:
    """Accuracy and loss of a genome: PruningNet weights, BN recalibrated, held-out batches."""

    def __init__(self, net, calib, heldout, opts: MetaPruningOptions, targets_from):
        self.net, self.opts, self.targets_from = net, opts, targets_from
        self.calib, self.heldout = unsharded(calib, opts.seed), unsharded(heldout, opts.seed)  # same on every rank

    def network(self, genome):
        slim = self.net.materialize(genome)
        recalibrate_bn(slim, _inputs_only(self.calib, self.opts.calib_batches, self.opts.seed),
                       batches=self.opts.calib_batches)
        return slim

    def __call__(self, genome) -> dict:
        res = evaluate(self.network(genome),
                       _labelled(self.heldout, self.opts.eval_batches, self.opts.seed, self.targets_from))
        return {"accuracy": res["accuracy"], "loss": res["loss"], "score": (res["accuracy"], -res["loss"])}


def _final_training(slim, data, opts: MetaPruningOptions, targets_from) -> list:
    scratch = opts.final == "scratch"
    if scratch:
        reinitialize(slim, opts.seed)
    epochs = opts.final_epochs or (128 if scratch else 16)
    lr = opts.final_lr or (0.1 if scratch else 0.01)
    cfg = TrainConfig(epochs=epochs, lr=lr, momentum=opts.momentum, weight_decay=opts.weight_decay,
                      schedule="triangular", peak_at=0.0, label_smoothing=opts.label_smoothing,
                      seed=opts.seed, progress=opts.progress)
    was = [(m, m.training) for m in slim.modules()]
    history = train(slim, data, cfg, targets_from=targets_from)
    for m, flag in was:
        m.training = flag
    return history.epochs


def _measured_choice(result, constraint: _GenomeLimits, encoding, channels, context: MethodContext,
                     latency_model: LatencyModel, target_s: float):
    """The best-scored searched genome whose slim model is *measured* under the latency target.

    Why: the search keeps genomes the latency model predicts under the target; the model can be
    wrong for the one it picks. As for every method (`fit_measured`), the slim model is measured
    end to end; while it is over the target the predicted limit shrinks (by target / measured) and
    the best-scored genome the search already evaluated under that limit is taken instead (no new
    search: every evaluated genome has its score). None under any limit, or every one measured
    over: `LatencyUnreachableError` with the best measured value. Returns (genome, MeasuredFit)."""
    cache = result.cache
    ranked = [result.best] + sorted((g for g in cache if g != result.best), key=lambda g: cache[g]["score"],
                                    reverse=True)
    genomes: dict[int, tuple] = {}

    def select(budget_s: float) -> PruningPlan:
        for genome in ranked:
            if constraint.within(genome, budget_s):
                plan = PruningPlan(keep=encoding.keep(genome))
                genomes[id(plan)] = genome
                return plan
        fits = [constraint.predicted_s(g) for g in ranked if constraint.within(g, None)]
        raise LatencyUnreachableError(budget_s, min(fits) if fits else float("inf"), latency_model.original_s,
                                      f" among the {len(cache)} structures the search evaluated", measured=False)

    fit = fit_measured(select, lambda plan: slim_latency(context, plan, latency_model), target_s,
                       latency_model=latency_model, channels=channels)
    return genomes[id(fit.plan)], fit


# -- the registry's runner ------------------------------------------------------------------------
def metapruning(analysis: ModelAnalysis, data, constraints: Constraints, opts: MetaPruningOptions, targets_from=None,
                *, measure_on: MeasureOn | None = None):
    """Train (or reuse) a PruningNet, search under the limits; the chosen structure's generated
    (and optionally trained) weights are written into `analysis`'s model: pass a private copy.
    A latency limit is predicted by the latency model of `analysis` on `measure_on` (default: the
    CPU, as analysed), profiled before the PruningNet trains; the final model is measured there.
    Returns (plan, details)."""
    flops = constraints.flops
    if constraints.params is None and opts.params is not None:  # the option, when compress(params=) is not given
        constraints = dataclasses.replace(constraints, params=opts.params)
    if data is None:
        raise TrainingError("metapruning needs data=: an iterable of (inputs, targets) training batches")
    opts = with_rank0_seed(opts)  # one split, one PruningNet, one search on every rank
    measure_on = MeasureOn() if measure_on is None else measure_on
    context = MethodContext(analysis, constraints, opts, data, targets_from, measure_on=measure_on)
    selection = constraints.selection()
    t0 = time.perf_counter()
    channels, cost = analysis.channels, analysis.cost
    encoding = _encoding(channels, opts, selection)
    if opts.search_data is not None:
        train_data, heldout = data, opts.search_data
    else:
        train_data, heldout = split_data(data, opts.holdout, opts.seed)
    details: dict = {"genes": len(encoding), "choices": list(encoding.space)}
    latency_model = latency = None
    if constraints.has_latency:  # before the PruningNet trains: an unreachable limit fails fast
        latency_model = _latency_model(analysis, opts, measure_on)
        latency = constraints.latency_target_s(latency_model.original_s)
    constraint = _GenomeLimits(encoding, cost, constraints, opts, latency_model, latency)
    constraint.check_reachable(flops)
    t_limits = time.perf_counter()
    net = opts.pruningnet
    if net is None:
        net = PruningNet(channels, encoding, opts.hidden, opts.bn_banks, opts.seed)
    scorer = _Scorer(net, train_data, heldout, opts, targets_from)
    if opts.pruningnet is None:
        if opts.pruningnet_sampling == "feasible":  # the limits without min_flops (see pruningnet_sampler)
            net.sampler = pruningnet_sampler(encoding, [_GenomeLimits(
                encoding, cost, constraints, dataclasses.replace(opts, min_flops=None), latency_model, latency)])
        details["pruningnet_training"], details["pruningnet_heldout"] = _train_until(
            net, scorer, encoding, [(flops, constraint)], train_data, opts, targets_from)
    else:
        net.check_compatible(channels, encoding)
        details["pruningnet_training"] = "reused"
        details["pruningnet_heldout"] = getattr(net, "heldout", None)  # from `pretrain`
    t1 = time.perf_counter()

    def evaluate_genome(genome):
        info = scorer(genome)
        info["macs_ratio"] = encoding.macs(cost, genome) / cost.total_macs
        return info

    scored = []  # how many candidates of each generation this rank scored

    def evaluate_generation(genomes: list) -> list:
        infos, mine = map_over_ranks(evaluate_genome, genomes)  # rank r: genomes[r::world], then gathered
        scored.append(mine)
        return infos

    sampler = None
    if opts.init_ratio_range is not None:
        sampler = lambda rng: encoding.random(rng, opts.init_ratio_range)  # noqa: E731
    result = evolve(encoding.space, None, constraint, opts.evolution(), summarize=("accuracy", "macs_ratio"),
                    ratio_sampler=sampler, evaluate_many=evaluate_generation)
    t2 = time.perf_counter()
    best = result.best
    if not constraint(best):  # the search only ever scores feasible genomes; this guards that contract
        raise AssertionError(f"the search returned an infeasible genome {best}")
    fit = None
    if latency_model is not None:  # measured before the final training: time does not depend on weights
        best, fit = _measured_choice(result, constraint, encoding, channels, context, latency_model, latency)
    slim = scorer.network(best)
    final_history = None
    if opts.final != "none":
        final_data = opts.final_data if opts.final_data is not None else train_data
        final_history = _final_training(slim, final_data, opts, targets_from)
    sync_from_rank0(slim)  # rank 0's weights and BN statistics on every rank (they drift in DDP training)
    write_back(channels, slim, encoding.keep_roots(best))
    plan = PruningPlan(keep=encoding.keep(best))
    macs = encoding.macs(cost, best)
    details.update({
        "genome": list(best), "widths": encoding.describe(best),
        "macs": macs, "flops": 2 * macs, "macs_ratio": macs / cost.total_macs,
        "params_ratio": encoding.params(cost, best) / cost.total_params,
        "search": {"best": {"accuracy": result.best_info["accuracy"], "loss": result.best_info["loss"]},
                   "chosen": {"accuracy": result.cache[best]["accuracy"], "loss": result.cache[best]["loss"],
                              "is_search_best": best == result.best},
                   "evaluated": len(result.cache), "rejected": dict(result.rejected), "history": result.history,
                   "ranks": rank_and_world()[1], "scored_by_this_rank": sum(scored)},
        "final": opts.final, "final_training": final_history,
        "seconds": {"limits": t_limits - t0, "pruningnet": t1 - t_limits, "search": t2 - t1,
                    "total": time.perf_counter() - t0},
    })
    if fit is not None:  # measured end to end (side by side with the original for a fraction)
        details["latency"] = latency_details(latency_model, context, plan, fit.measured_s, {
            "fraction": constraints.latency, "genome_predicted_s": constraint.predicted_s(best),
            "measured_within_target": fit.measured_s <= latency, "rounds": fit.rounds,
            "latency_model": {"source": "reused" if opts.latency_model is not None else latency_model.source,
                              "offset_s": latency_model.offset, "scale": latency_model.scale}})
    return plan, details


@dataclass(frozen=True)
class MetaPruningMethod:
    """MetaPruning as a `fxprune.methods.Method`: searches on a private copy, returns the plan and
    the copy's weights (the PruningNet's weights for the chosen structure)."""

    name = "metapruning"
    options_type = MetaPruningOptions
    supports = frozenset({"params", "latency", "round_to", "min_channels", "min_ratio"})
    needs_data = True

    def run(self, context: MethodContext) -> MethodResult:
        if context.constraints.round_to_auto:  # its width choices are a fixed ratio grid, shared with the PruningNet
            raise ConfigError("metapruning does not support round_to='auto': give round_to=N (e.g. 8) or a latency "
                              "target, which its search honours on the latency model")
        work = context.private_copy()
        plan, details = metapruning(work, context.data, context.constraints, context.options, context.original,
                                    measure_on=context.measure_on)
        return MethodResult(plan, details, weights=work.traced.graph_module.state_dict())


__all__ = ["LatencyUnreachableError", "MetaPruningOptions", "pretrain", "metapruning", "MetaPruningMethod", "split_data",
           "pruningnet_sampler", "train_pruningnet"]
