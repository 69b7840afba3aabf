"""Evolutionary search: mutation/crossover keep genomes valid, the constraint is never broken,
nothing is evaluated twice, the search finds the optimum of problems whose optimum is known."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.errors import ConfigError
from fxprune.methods.metapruning.evolution import EvolutionConfig, crossover, evolve, mutate, repair

spaces = st.lists(st.integers(1, 31), min_size=1, max_size=20)


def _genome(space, rng):
    return tuple(int(rng.integers(n)) for n in space)


@settings(max_examples=60, deadline=None)
@given(space=spaces, seed=st.integers(0, 2**31), prob=st.floats(0.01, 1.0))
def test_mutation_keeps_genomes_valid_and_changes_to_different_choices(space, seed, prob):
    rng = np.random.default_rng(seed)
    g = _genome(space, rng)
    m = mutate(g, tuple(space), prob, rng)
    assert len(m) == len(g)
    assert all(0 <= v < n for v, n in zip(m, space))
    # with probability 1 every gene that has another choice takes a different one
    full = mutate(g, tuple(space), 1.0, rng)
    assert all((a != b) == (n > 1) for a, b, n in zip(g, full, space))


@settings(max_examples=60, deadline=None)
@given(space=spaces, seed=st.integers(0, 2**31))
def test_crossover_takes_each_gene_from_a_parent(space, seed):
    rng = np.random.default_rng(seed)
    a, b = _genome(space, rng), _genome(space, rng)
    c = crossover(a, b, rng)
    assert len(c) == len(a) and all(x in (p, q) for x, p, q in zip(c, a, b))


def test_mutation_rate_is_per_gene():
    rng = np.random.default_rng(0)
    g = tuple([5] * 200)
    changed = np.mean([sum(x != 5 for x in mutate(g, (31,) * 200, 0.1, rng)) for _ in range(200)])
    assert 17 <= changed <= 23  # 200 genes x 0.1


def test_repair_reaches_feasibility_or_reports_none():
    rng = np.random.default_rng(0)
    feasible = lambda g: sum(g) <= 10  # noqa: E731
    fixed = repair((30, 30, 30), feasible, rng)
    assert fixed is not None and feasible(fixed) and all(0 <= v <= 30 for v in fixed)
    assert repair((5, 5), lambda g: sum(g) < 0, rng) is None


def _problem(space, budget):
    calls = []

    def evaluate(g):
        calls.append(g)
        return {"score": float(sum(g)), "size": float(sum(g))}

    return evaluate, (lambda g: sum(g) <= budget), calls


def test_search_respects_the_constraint_and_never_repeats_an_evaluation():
    space = (31,) * 8
    evaluate, feasible, calls = _problem(space, 60)
    cfg = EvolutionConfig(population=20, generations=10, parents=5, mutations=8, crossovers=8, seed=1)
    result = evolve(space, evaluate, feasible, cfg, summarize=("size",))
    assert all(sum(g) <= 60 for g in calls)  # nothing over the constraint is even scored
    assert len(calls) == len(set(calls)) == len(result.cache)
    assert feasible(result.best) and result.best_info["score"] == max(sum(g) for g in calls)
    assert len(result.history) == 10 and all(r["evaluated"] <= 20 for r in result.history)
    assert result.history[-1]["pool_best_size"] >= result.history[0]["pool_best_size"]
    assert result.history[-1]["pool_best_size"] >= 58  # maximising sum under sum <= 60: near the boundary
    assert result.rejected.get("constraint", 0) > 0


def test_search_finds_a_known_optimum():
    # separable: the best value of each gene is known, and the constraint does not bind
    target = (3, 17, 0, 9, 25, 30)
    space = (31,) * len(target)

    def evaluate(g):
        return {"score": -sum(abs(a - b) for a, b in zip(g, target))}

    result = evolve(space, evaluate, lambda g: True,
                    EvolutionConfig(population=30, generations=25, parents=10, mutations=15, crossovers=15, seed=0))
    assert result.best_info["score"] >= -2


def test_tight_constraint_is_filled_by_repair():
    # only genomes with sum <= 2 are feasible: rejection sampling almost never finds one
    space = (31,) * 10
    evaluate, feasible, calls = _problem(space, 2)
    result = evolve(space, evaluate, lambda g: sum(g) <= 2,
                    EvolutionConfig(population=10, generations=3, parents=3, mutations=3, crossovers=3))
    assert calls and all(sum(g) <= 2 for g in calls)
    assert sum(result.best) <= 2


def test_a_band_constraint_is_kept():
    # the authors' ResNet search keeps FLOPs in a band [min, max]: repair walks that overshoot the
    # lower limit are dropped, the others fill the population
    space = (31,) * 10
    evaluate, _, calls = _problem(space, 0)
    band = lambda g: 40 <= sum(g) <= 44  # noqa: E731
    result = evolve(space, evaluate, band, EvolutionConfig(population=12, generations=3, parents=4, mutations=4,
                                                           crossovers=4))
    assert len(calls) >= 12 and all(band(g) for g in calls) and band(result.best)


def test_ratio_sampler_limits_the_initial_population():
    space = (31,) * 4
    seen = []

    def evaluate(g):
        seen.append(g)
        return {"score": 0.0}

    evolve(space, evaluate, lambda g: True, EvolutionConfig(population=12, generations=1, parents=2),
           ratio_sampler=lambda rng: tuple(int(rng.integers(12, 24)) for _ in space))
    assert len(seen) == 12 and all(12 <= v < 24 for g in seen for v in g)


def test_bad_configuration_and_impossible_constraints():
    with pytest.raises(ConfigError, match="parents"):
        EvolutionConfig(population=5, parents=6)
    with pytest.raises(ConfigError, match="mutation_prob"):
        EvolutionConfig(mutation_prob=0.0)
    with pytest.raises(ConfigError, match="no feasible genome"):
        evolve((4, 4), lambda g: {"score": 0.0}, lambda g: False, EvolutionConfig(population=4, parents=2))
    with pytest.raises(ConfigError, match="search space"):
        evolve((), lambda g: {"score": 0.0}, lambda g: True, EvolutionConfig())


def test_scoring_a_whole_generation_at_once_gives_the_same_search():
    """`evaluate_many` (how MetaPruning splits a generation over torchrun ranks) changes nothing."""
    space = (9, 9, 9, 9)
    cfg = EvolutionConfig(population=8, generations=4, parents=3, mutations=4, crossovers=4, seed=3)
    calls = []

    def score(g):
        return {"score": -abs(sum(g) - 17) - 0.01 * g[0]}

    def feasible(g):
        return sum(g) <= 20

    def many(genomes):
        calls.append(len(genomes))
        return [score(g) for g in genomes]

    def steps(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    one = evolve(space, score, feasible, cfg)
    whole = evolve(space, None, feasible, cfg, evaluate_many=many)
    assert whole.best == one.best and whole.cache == one.cache and whole.rejected == one.rejected
    assert steps(whole.history) == steps(one.history)
    assert calls == [r["evaluated"] for r in one.history]  # one call per generation
    with pytest.raises(ConfigError, match="evaluate"):
        evolve(space, None, feasible, cfg)
    with pytest.raises(ConfigError, match="returned 0 results"):
        evolve(space, None, feasible, cfg, evaluate_many=lambda genomes: [])
