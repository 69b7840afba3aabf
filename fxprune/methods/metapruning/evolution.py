"""Evolutionary search over genomes, as MetaPruning's authors run it (`searching/search.py`).

A genome is a tuple of choice indices, gene i in ``range(space[i])``. Every generation evaluates
its new candidates (results cached by genome, so nothing is scored twice); the pool is the best
`population` genomes ever seen and the parents its best `parents`. The next generation is
`mutations` mutants (a random parent, each gene replaced with probability `mutation_prob` by a
uniformly random *different* choice), `crossovers` children (two distinct parents, each gene from
either with probability 1/2), then random genomes up to `population`. Every generated genome is
rejected if it is a duplicate (seen before or already in the generation) or infeasible (the hard
constraint, by rejection). When rejection sampling cannot find random feasible genomes (a tight
constraint), random genomes are *repaired*: random genes are stepped down until feasible, which
suits upper limits (FLOPs, params, latency: shrinking a width never breaks them); a walk that
steps past a lower limit (`min_flops`) is dropped and another one tried.

Example::

    >>> result = evolve((31, 31, 31), lambda g: {"score": -abs(sum(g) - 40)}, lambda g: sum(g) <= 45,
    ...                 EvolutionConfig(population=20, generations=5))
    >>> sum(result.best) <= 45
    True
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fxprune.errors import ConfigError


@dataclass
class EvolutionConfig:
    population: int = 50
    generations: int = 20
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    ratio_range: tuple | None = None  # initial population only (the authors' ResNet: (0.46, 0.79))
    max_tries: int = 10  # rejection attempts per wanted candidate, as the authors' retry rounds
    seed: int = 0

    def __post_init__(self):
        if self.population < 1 or self.generations < 1 or not 1 <= self.parents <= self.population:
            raise ConfigError(f"evolution needs population >= 1, generations >= 1 and 1 <= parents <= population "
                              f"(got {self.population}, {self.generations}, {self.parents})")
        if self.mutations < 0 or self.crossovers < 0 or not 0 < self.mutation_prob <= 1:
            raise ConfigError("mutations and crossovers must be >= 0 and mutation_prob in (0, 1]")


@dataclass
class SearchResult:
    best: tuple
    best_info: dict
    history: list  # one dict per generation
    cache: dict = field(repr=False)  # genome -> info of every evaluated genome
    rejected: dict = field(default_factory=dict)  # why generated genomes were refused: counts


def mutate(genome: tuple, space: tuple, prob: float, rng: np.random.Generator) -> tuple:
    """Each gene, with probability `prob`, becomes a uniformly random *different* choice."""
    out = list(genome)
    for i, n in enumerate(space):
        if n > 1 and rng.random() < prob:
            out[i] = int((out[i] + rng.integers(1, n)) % n)
    return tuple(out)


def crossover(a: tuple, b: tuple, rng: np.random.Generator) -> tuple:
    """Each gene from `a` or `b` with probability 1/2."""
    pick = rng.random(len(a)) < 0.5
    return tuple(int(x if p else y) for x, y, p in zip(a, b, pick))


def repair(genome: tuple, feasible: Callable, rng: np.random.Generator) -> tuple | None:
    """Step random genes (not yet at 0) down until feasible; None when even all zeros is not."""
    g = list(genome)
    while not feasible(tuple(g)):
        movable = [i for i, v in enumerate(g) if v > 0]
        if not movable:
            return None
        i = movable[int(rng.integers(len(movable)))]
        g[i] -= max(1, int(math.ceil(g[i] * 0.1)))
        g[i] = max(g[i], 0)
    return tuple(g)


class _Generation:
    """Collects a generation's candidates, refusing duplicates and infeasible genomes."""

    def __init__(self, seen: dict, feasible: Callable, rejected: dict):
        self.seen, self.feasible, self.rejected = seen, feasible, rejected
        self.items: list[tuple] = []
        self._set: set = set()

    def offer(self, genome: tuple) -> bool:
        if genome in self.seen or genome in self._set:
            self.rejected["duplicate"] = self.rejected.get("duplicate", 0) + 1
            return False
        if not self.feasible(genome):
            self.rejected["constraint"] = self.rejected.get("constraint", 0) + 1
            return False
        self.items.append(genome)
        self._set.add(genome)
        return True


def _random_fill(gen: _Generation, space, cfg, rng, target: int, ratio_sampler: Callable | None) -> None:
    tries = 0
    while len(gen.items) < target and tries < cfg.max_tries * target:
        tries += 1
        g = ratio_sampler(rng) if ratio_sampler else tuple(int(rng.integers(n)) for n in space)
        gen.offer(g)
    repairs = 0
    while len(gen.items) < target and repairs < cfg.max_tries * target:
        repairs += 1
        g = ratio_sampler(rng) if ratio_sampler else tuple(int(rng.integers(n)) for n in space)
        fixed = repair(g, gen.feasible, rng)
        if fixed is not None:  # None: this walk stepped past a lower limit (or nothing is feasible)
            gen.offer(fixed)


def _summary(generation: int, new: list, cache: dict, key: Callable, summarize: tuple, population: int,
             seconds: float) -> dict:
    row = {"generation": generation, "evaluated": len(new), "seconds": round(seconds, 3)}
    infos = [cache[g] for g in new]
    if infos:
        best = max(infos, key=key)
        for k in summarize:
            vals = [float(i[k]) for i in infos if k in i]
            if vals:
                row[f"best_{k}"] = float(best.get(k, float("nan")))
                row[f"mean_{k}"] = float(np.mean(vals))
    pool = sorted(cache.values(), key=key, reverse=True)[:population]
    for k in summarize:
        if pool and k in pool[0]:
            row[f"pool_best_{k}"] = float(pool[0][k])
    return row


def evolve(space: tuple, evaluate: Callable[[tuple], dict] | None, feasible: Callable[[tuple], bool],
           cfg: EvolutionConfig, *, key: Callable[[dict], object] = lambda info: info["score"],
           summarize: tuple = (), ratio_sampler: Callable | None = None,
           on_generation: Callable[[dict], None] | None = None,
           evaluate_many: Callable[[list], list] | None = None) -> SearchResult:
    """Search `space` for the feasible genome with the highest ``key(evaluate(genome))``.

    `evaluate` returns a dict (``score`` by default is what is maximised; `summarize` names the
    numeric fields whose per-generation best/mean go into the history). `evaluate_many(genomes)`,
    when given, replaces it: the dicts of a whole generation at once, in its order (e.g. scored
    in parts by several processes and gathered); the search is the same either way.
    `ratio_sampler(rng)` replaces uniform sampling for the initial population (e.g. the authors'
    limited ratio range).
    """
    space = tuple(int(n) for n in space)
    if not space or any(n < 1 for n in space):
        raise ConfigError(f"search space {space} must have at least one gene with at least one choice")
    if evaluate_many is None:
        if evaluate is None:
            raise ConfigError("evolve needs evaluate= (one genome) or evaluate_many= (a generation)")

        def evaluate_many(genomes: list) -> list:
            return [evaluate(g) for g in genomes]
    rng = np.random.default_rng(cfg.seed)
    cache: dict[tuple, dict] = {}
    rejected: dict[str, int] = {}
    history = []
    gen = _Generation(cache, feasible, rejected)
    _random_fill(gen, space, cfg, rng, cfg.population, ratio_sampler)
    if not gen.items:
        raise ConfigError("no feasible genome found: not even the smallest widths meet the constraint")
    for generation in range(cfg.generations):
        t0 = time.perf_counter()
        new = gen.items
        infos = list(evaluate_many(new))
        if len(infos) != len(new):
            raise ConfigError(f"evaluate_many returned {len(infos)} results for {len(new)} genomes")
        for g, info in zip(new, infos):
            cache[g] = dict(info)
        row = _summary(generation, new, cache, key, summarize, cfg.population, time.perf_counter() - t0)
        history.append(row)
        if on_generation is not None:
            on_generation(row)
        if generation == cfg.generations - 1:
            break
        pool = sorted(cache, key=lambda g: key(cache[g]), reverse=True)[:cfg.population]
        parents = pool[:cfg.parents]
        gen = _Generation(cache, feasible, rejected)
        tries = 0
        while len(gen.items) < cfg.mutations and tries < cfg.max_tries * max(cfg.mutations, 1):
            tries += 1
            gen.offer(mutate(parents[int(rng.integers(len(parents)))], space, cfg.mutation_prob, rng))
        tries, wanted = 0, len(gen.items) + cfg.crossovers
        while len(parents) > 1 and len(gen.items) < wanted and tries < cfg.max_tries * max(cfg.crossovers, 1):
            tries += 1
            i, j = rng.choice(len(parents), 2, replace=False)
            gen.offer(crossover(parents[int(i)], parents[int(j)], rng))
        _random_fill(gen, space, cfg, rng, cfg.population, None)
        if not gen.items:
            break  # the feasible space is exhausted
    best = max(cache, key=lambda g: key(cache[g]))
    return SearchResult(best, cache[best], history, cache, rejected)


__all__ = ["EvolutionConfig", "SearchResult", "crossover", "evolve", "mutate", "repair"]
