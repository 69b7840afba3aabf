"""The trained methods under torch.distributed: 2 CPU processes (gloo) prune identically.

Each rank is started with a seed of its own (``seed=rank``) and reads its own shard of the data
(a DistributedSampler): only the methods' syncing makes their results agree, bit for bit.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from fxprune.distributed import (
    average_across_ranks,
    map_over_ranks,
    rank0_value,
    run_on_rank0,
)
from fxprune.errors import ConfigError

from .handler_models import ResidualClassifier

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _sharded(rank: int, world: int, n: int) -> DataLoader:
    """`n` labelled samples (the same on every rank), this rank's shard of them."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(ds, batch_size=16, sampler=DistributedSampler(ds, world, rank, shuffle=True, seed=0))


def _gate_decorator(rank: int, world: int, out_dir: str) -> tuple:
    import fxprune

    torch.manual_seed(0)
    slim = fxprune.compress(ResidualClassifier().eval(), "gate_decorator", X, 0.6, data=_sharded(rank, world, 96),
                            options={"schedule": "tick_tock", "p": 0.2, "T": 2, "tock_epochs": 1, "finetune_epochs": 1,
                                     "seed": rank})
    return slim, {}


def _helpers(rank: int) -> dict:
    """The fxprune.distributed helpers the methods build on, on 2 ranks."""
    t = torch.tensor([float(rank), 10.0 * rank])
    average_across_ranks([t, None])
    def refuse():
        raise ConfigError("rank 0 refused")

    try:
        run_on_rank0(refuse)
        raised = None
    except ConfigError as exc:  # raised on every rank, as itself
        raised = str(exc)
    return {"rank0_value": rank0_value(f"rank {rank}"), "run_on_rank0": run_on_rank0(lambda: rank),
            "mean": t.tolist(), "map": map_over_ranks(lambda v: (v, rank), list(range(5))), "raised": raised}


class _RankTimer:
    """A fake latency timer whose seconds differ per rank (as real wall times do)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, call) -> float:
        return (1 + self.rank) * (1e-5 if call.kind == "layer" else 1e-4)


def _latency(rank: int, out_dir: str) -> dict:
    """A latency profile and a slim model's measured seconds: rank 0's on every rank."""
    from fxprune.passes.plan import PruningPlan

    import fxprune
    from fxprune.constraints import Constraints
    from fxprune.latency_model import profile_latency
    from fxprune.methods import latency_target
    from fxprune.methods.base import MethodContext

    analysis = fxprune.analyze(ResidualClassifier().eval(), X)
    model = profile_latency(analysis, timer=_RankTimer(rank), points=3, cache_dir=os.path.join(out_dir, f"c{rank}"))
    latency_target.measure_model = lambda *args, **kwargs: 1.0 + rank  # this process only
    measured = latency_target.slim_latency(MethodContext(analysis, Constraints(flops=1.0), None), PruningPlan())
    return {"original_s": model.original_s, "measured_s": measured}


def _gal(rank: int, world: int, out_dir: str) -> tuple:
    import fxprune

    helpers = {**_helpers(rank), **_latency(rank, out_dir)}
    torch.manual_seed(0)
    slim = fxprune.compress(ResidualClassifier().eval(), "gal", X, 0.6, data=_sharded(rank, world, 64),
                            options={"structures": ("channel", "block"), "epochs": 2, "mask_step": 1, "lam": 30.0,
                                     "finetune_epochs": 1, "seed": rank})
    d = slim.fxprune_report.details
    return slim, {"helpers": helpers, "macs_ratio": slim.fxprune_report.macs_ratio,
                  **{k: d[k] for k in ("removed_blocks", "widths", "mask_steps", "epochs", "reached_by")}}


def _metapruning(rank: int, world: int, out_dir: str) -> tuple:
    import fxprune

    torch.manual_seed(0)
    slim = fxprune.compress(ResidualClassifier().eval(), "metapruning", X, 0.6, data=_sharded(rank, world, 96),
                            options={"epochs": 1, "population": 6, "generations": 2, "parents": 3, "mutations": 3,
                                     "crossovers": 3, "calib_batches": 2, "final": "finetune", "final_epochs": 1,
                                     "seed": rank})
    d = slim.fxprune_report.details
    return slim, {"macs_ratio": slim.fxprune_report.macs_ratio, "genome": d["genome"], "widths": d["widths"],
                  "search": d["search"]}


CASES = {"gate_decorator": _gate_decorator, "gal": _gal, "metapruning": _metapruning}


def _worker(rank: int, world: int, init_file: str, out_dir: str, case: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        slim, info = CASES[case](rank, world, out_dir)
        torch.save({"state": {k: v.clone() for k, v in slim.state_dict().items()}, "info": info},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(case: str, tmp_path, world: int = 2) -> list[dict]:
    """Run `case` on `world` gloo ranks; each rank's saved {"state": slim state_dict, "info": ...}."""
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), case), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _weights(state: dict) -> int:
    return sum(v.numel() for k, v in state.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_two_cpu_ranks_prune_identically(tmp_path):
    a, b = _run("gate_decorator", tmp_path)
    _assert_identical(a["state"], b["state"])
    assert _weights(a["state"]) < sum(p.numel() for p in ResidualClassifier().parameters())


def test_gal_on_two_cpu_ranks_is_bit_identical(tmp_path):
    a, b = _run("gal", tmp_path)
    _assert_identical(a["state"], b["state"])
    info, h0 = a["info"], a["info"].pop("helpers")
    h1 = b["info"].pop("helpers")
    assert info == b["info"]  # removed blocks, widths, every mask step, the rank-averaged losses
    assert info["macs_ratio"] < 1 and _weights(a["state"]) < sum(p.numel() for p in ResidualClassifier().parameters())
    assert any(s["macs_ratio"] < 1 for s in info["mask_steps"])  # FISTA zeroed masks during training
    assert h0["rank0_value"] == h1["rank0_value"] == "rank 0" and h0["run_on_rank0"] == h1["run_on_rank0"] == 0
    assert h0["mean"] == h1["mean"] == [0.5, 5.0]
    assert h0["map"][0] == h1["map"][0] == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]  # in order, gathered
    assert (h0["map"][1], h1["map"][1]) == (3, 2)
    assert h0["raised"] == h1["raised"] == "rank 0 refused"
    assert h0["original_s"] == h1["original_s"] and h0["measured_s"] == h1["measured_s"] == 1.0  # rank 0's


def test_metapruning_on_two_cpu_ranks_is_bit_identical(tmp_path):
    a, b = _run("metapruning", tmp_path)
    _assert_identical(a["state"], b["state"])
    ia, ib = a["info"], b["info"]
    assert ia["genome"] == ib["genome"] and ia["widths"] == ib["widths"] and ia["macs_ratio"] == ib["macs_ratio"] < 0.6
    sa, sb = ia["search"], ib["search"]
    assert sa["ranks"] == sb["ranks"] == 2
    # each rank scored only its part of every generation; the gathered scores cover every candidate
    assert 0 < sa["scored_by_this_rank"] < sa["evaluated"] and 0 < sb["scored_by_this_rank"] < sb["evaluated"]
    assert sa["scored_by_this_rank"] + sb["scored_by_this_rank"] == sa["evaluated"] == sb["evaluated"]
    for s in (sa, sb):
        s.pop("scored_by_this_rank")
        for row in s["history"]:
            row.pop("seconds")  # wall time of the rank
    assert sa == sb  # the same best score, history, rejections on both ranks


def _diverging_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 1's data holds a NaN: both ranks must stop with a TrainingError, neither may wait."""
    from fxprune.train import TrainConfig, TrainingError, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(rank))
        if rank == 1:
            x[5] = float("nan")
        data = DataLoader(TensorDataset(x, torch.randint(0, 4, (32,))), batch_size=32)
        try:
            train(ResidualClassifier(), data, TrainConfig(epochs=2, lr=0.01, progress=False))
            outcome = "trained"
        except TrainingError as exc:
            outcome = str(exc)
        torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_loss_that_diverges_on_one_rank_stops_every_rank(tmp_path):
    context = mp.spawn(_diverging_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    import time

    deadline = time.monotonic() + 60
    while not context.join(timeout=5):  # True once every rank has exited
        if time.monotonic() > deadline:  # a hang: a rank waiting in the next collective
            for p in context.processes:
                p.kill()
            raise AssertionError("a rank kept waiting after the other's loss became non-finite")
    outcomes = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert "non-finite on another rank" in outcomes[0], outcomes
    assert "loss became nan at epoch 0" in outcomes[1], outcomes
