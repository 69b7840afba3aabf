"""Gate Decorator under torch.distributed: 2 CPU processes (gloo) prune identically."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import fxprune

    from .test_gate_decorator import _Head

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _Head().eval()  # the same model on every rank
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(96, 3, 8, 8, generator=g), torch.randint(0, 4, (96,), generator=g))
        data = DataLoader(ds, batch_size=16, sampler=DistributedSampler(ds, world, rank, shuffle=True, seed=0))
        slim = fxprune.compress(model, "gate_decorator", torch.randn(2, 3, 8, 8), 0.6, data=data,
                                options=dict(schedule="tick_tock", p=0.2, T=2, tock_epochs=1, finetune_epochs=1,
                                             seed=rank))  # different seeds: only the syncing makes them agree
        torch.save({k: v.clone() for k, v in slim.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_cpu_ranks_prune_identically(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = sum(p.numel() for p in __import__("tests.test_gate_decorator", fromlist=["_Head"])._Head().parameters())
    assert sum(v.numel() for k, v in a.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) < full
