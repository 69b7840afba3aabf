"""torch.distributed helpers shared by the trained methods (launched with ``torchrun``).

Every helper is a no-op (or the single-process answer) outside an initialised process group of
more than one rank, so the methods call them unconditionally. Every helper is *collective* under
distributed: every rank must call it, in the same order, or the ranks wait for each other forever.

What they are for: a pruning decision taken from per-rank numbers (gradients, scores, wall times)
would differ between ranks, and the ranks would then train different networks. So the methods
either average what they learn from (`average_across_ranks`), take rank 0's value
(`rank0_value`, `run_on_rank0`, `sync_from_rank0`), or split work and gather the results in order
(`map_over_ranks`); their decisions are then bit-identical on every rank.

Example (a script run with ``torchrun --nproc_per_node=2 script.py``)::

    >>> rank, world = fxprune.train.init_distributed()
    >>> loader = DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds))
    >>> slim = fxprune.compress(model, "gal", x, 0.5, data=loader)   # the same slim model on every rank
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import FxpruneError


class DistributedError(FxpruneError):
    """An error raised on rank 0 inside `run_on_rank0` that could not be sent as itself."""


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR in the environment):
    gloo on CPU, nccl on GPU. Returns (rank, world size); (0, 1) when not launched by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this rank, number of ranks); (0, 1) without distributed."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def sync_from_rank0(model: nn.Module) -> None:
    """Make every rank's parameters and buffers identical to rank 0's (no-op without distributed)."""
    import torch.distributed as dist

    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def rank0_value(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; `value` itself without distributed.
    For what each rank computed but only one answer may decide: a seed, a measured time, a plan."""
    import torch.distributed as dist

    if not is_distributed():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_rank0(fn: Callable[[], Any]) -> Any:
    """`fn()` computed on rank 0 only, its result on every rank (`fn()` itself without distributed).

    For wall-time measurements: the other ranks wait instead of measuring at the same time (they
    would share the CPU or the host and disturb rank 0's timing), and a profile cache is written by
    one process only. An exception on rank 0 is raised on every rank (as itself when it pickles,
    else as a DistributedError with its message), so no rank is left waiting alone.
    """
    if not is_distributed():
        return fn()
    outcome = None
    if rank_and_world()[0] == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised here too
            outcome = ("error", _portable(exc))
    kind, payload = rank0_value(outcome)
    if kind == "error":
        raise payload
    return payload


def with_rank0_seed(options: Any) -> Any:
    """`options` (a dataclass with a `seed`) with rank 0's seed; `options` itself without
    distributed. A copy: the caller's options are not changed. Every seeded choice a method makes
    (initial values, sampled structures, data splits, the search's random draws) is then the same
    on every rank, even when each rank was started with a seed of its own."""
    if not is_distributed():
        return options
    return dataclasses.replace(options, seed=rank0_value(options.seed))


def _portable(exc: Exception) -> Exception:
    """`exc` when it survives pickling (what broadcast_object_list does), else a DistributedError."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send the message instead
        return DistributedError(f"on rank 0: {type(exc).__name__}: {exc}")


def average_across_ranks(tensors: Iterable[torch.Tensor | None]) -> None:
    """Replace each tensor (None skipped) in place by its mean over the ranks.

    One flattened all-reduce per (device, dtype), not one per tensor: a network's gradients are
    many small tensors, and each all-reduce has a fixed latency. The ranks must pass tensors of the
    same shapes in the same order (the same network, the same None gradients).
    """
    import torch.distributed as dist

    if not is_distributed():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t)
    world = dist.get_world_size()
    with torch.no_grad():
        for members in groups.values():
            flat = torch.cat([t.reshape(-1) for t in members])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for t in members:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the `.grad` of `params` over the ranks (what DDP does, for loops that step several
    optimizers or step on their own schedule)."""
    average_across_ranks(p.grad for p in params)


def map_over_ranks(fn: Callable[[Any], Any], items: Sequence) -> tuple[list, int]:
    """([fn(item) for item in items], how many this rank computed), the work split over the ranks.

    Rank r computes ``items[r::world]``; the results are gathered (`all_gather_object`) and put
    back in the order of `items`, so every rank holds the same list. `fn` must not call
    collectives (the ranks run it a different number of times).
    """
    import torch.distributed as dist

    if not is_distributed():
        return [fn(item) for item in items], len(items)
    rank, world = rank_and_world()
    mine = [fn(item) for item in items[rank::world]]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    out: list = [None] * len(items)
    for r, results in enumerate(gathered):
        out[r::world] = results
    return out, len(mine)


__all__ = ["DistributedError", "average_across_ranks", "average_gradients", "init_distributed", "is_distributed",
           "map_over_ranks", "rank0_value", "rank_and_world", "run_on_rank0", "sync_from_rank0", "with_rank0_seed"]
