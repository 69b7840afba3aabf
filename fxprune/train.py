"""Training harness shared by the data-driven methods: train, evaluate, fine-tune, recalibrate BN.

* schedules (per step): ``constant``, ``step`` (x gamma at the milestone fractions), ``cosine``
  (to zero), ``triangular`` (linear up to the peak at `peak_at`, then down to zero — the Tock
  schedule of Gate Decorator);
* seeded determinism: the seed fixes initial RNG state and the data order;
* checkpoint and resume: model, optimizer, scheduler, epoch and RNG state, saved at the end of
  every epoch with ``torch.save`` and read back with ``torch.load(weights_only=True)``;
* BN recalibration: reset running statistics, forward N batches in train mode without grad,
  using a cumulative average (momentum None) so the result is the plain mean over those batches;
* torch.distributed: under ``torchrun`` (`init_distributed`) `train` wraps the model in DDP; the
  helpers the methods use to stay bit-identical across ranks live in `fxprune.distributed`
  (`init_distributed`, `is_distributed` and `sync_from_rank0` are importable from here too).

Example::

    >>> cfg = TrainConfig(epochs=2, lr=0.05, schedule="cosine")
    >>> history = train(model, loader, cfg)
    >>> evaluate(model, test_loader)["accuracy"]
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .distributed import init_distributed, is_distributed, sync_from_rank0  # noqa: F401 - re-exported
from .errors import ConfigError, FxpruneError
from .verify import eval_mode

SCHEDULES = ("constant", "step", "cosine", "triangular")


class TrainingError(FxpruneError):
    """Training cannot go on (no data, a non-finite loss)."""


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: tuple = (0.5, 0.75)  # fractions of the run (step schedule)
    gamma: float = 0.1
    peak_at: float = 0.3  # fraction of the run where the triangular schedule peaks
    lr_min_ratio: float = 0.0  # triangular: starts and ends at lr * lr_min_ratio (Gate Decorator: 0.1)
    label_smoothing: float = 0.0
    seed: int = 0
    checkpoint: str | None = None  # file; resumed from when it exists
    progress: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.lr <= 0:
            raise ConfigError("epochs must be >= 1 and lr > 0")


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning-rate multiplier at `step` of `total` steps."""
    t = step / max(total, 1)
    if cfg.schedule == "step":
        return cfg.gamma ** sum(t >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "triangular":
        up = t / cfg.peak_at if t < cfg.peak_at else max(0.0, (1 - t) / (1 - cfg.peak_at))
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * up
    return 1.0


@dataclass
class History:
    epochs: list = field(default_factory=list)  # dicts: epoch, loss, accuracy, lr, seconds


def _batches(data: Iterable, epoch: int, seed: int):
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(data, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed + epoch)
    return iter(data)


def train(model: nn.Module, data: Iterable, cfg: TrainConfig, *, loss_fn: Callable | None = None,
          params: Iterable | None = None, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          after_backward: Callable[[], None] | None = None, targets_from: nn.Module | None = None) -> History:
    """Train `model` in place on `(inputs, targets)` batches; returns the per-epoch history.

    `params` restricts what is optimised (e.g. only gates); `extra_loss(model)` is added to every
    step's loss (e.g. an L1 penalty on gates); `after_backward()` runs after each backward pass
    (e.g. to accumulate Taylor scores). Batches without targets (bare input tensors) are labelled
    by `targets_from`'s predictions (the original model), or refused when it is None.
    """
    torch.manual_seed(cfg.seed)
    default_loss = loss_fn is None
    loss_fn = loss_fn or nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    forward = _distributed(model)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:
        steps_per_epoch = len(data)
    except TypeError:
        steps_per_epoch = None
    if steps_per_epoch == 0:
        raise TrainingError("the training data is empty: pass an iterable of (inputs, targets) batches")
    history, start_epoch, step = History(), 0, 0
    if cfg.checkpoint and os.path.exists(cfg.checkpoint):
        start_epoch, step, history = _resume(cfg.checkpoint, model, optimizer)
    total = (steps_per_epoch or 1) * cfg.epochs
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for batch in _batches(data, epoch, cfg.seed):
            inputs, targets = _split_batch(batch, targets_from)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step, total)
            out = forward(inputs)
            if default_loss and not isinstance(out, torch.Tensor):
                raise TrainingError(
                    f"the model returned a {type(out).__name__}, not one tensor of class scores, in train mode, "
                    "so the cross-entropy loss cannot take it (torchvision's GoogLeNet / Inception v3 return "
                    "auxiliary outputs in training): build the model without them (aux_logits=False) or make "
                    "its forward return the logits alone")
            loss = loss_fn(out, targets)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            if not _finite_on_every_rank(loss):
                value = "non-finite on another rank" if torch.isfinite(loss) else loss.item()
                raise TrainingError(f"the loss became {value} at epoch {epoch}, step {step}: lower the learning "
                                    "rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            step += 1
            seen += len(targets)
            loss_sum += float(loss.detach()) * len(targets)
            if cfg.progress and sys.stderr.isatty():
                _bar(epoch, cfg.epochs, step - epoch * (steps_per_epoch or 0), steps_per_epoch, loss_sum / seen)
            if isinstance(out, torch.Tensor) and out.ndim == 2 and targets.ndim == 1:
                correct += int((out.argmax(1) == targets).sum())
        if seen == 0:
            raise TrainingError("the training data is empty: pass an iterable of (inputs, targets) batches")
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        history.epochs.append(row)
        if cfg.progress:
            if sys.stderr.isatty():
                sys.stderr.write("\r\033[K")
            print(f"epoch {row['epoch']}/{cfg.epochs} loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
                  f"lr {row['lr']:.2e} {row['seconds']:.1f}s", file=sys.stderr)
        if cfg.checkpoint:
            _save(cfg.checkpoint, model, optimizer, epoch + 1, step, history)
    return history


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: under torch.distributed one small all-reduce, so a
    rank whose loss diverged stops every rank with it instead of leaving them waiting in the next
    collective."""
    finite = bool(torch.isfinite(loss))
    if not is_distributed():
        return finite
    import torch.distributed as dist

    flag = torch.tensor([1.0 if finite else 0.0], device=loss.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def _bar(epoch: int, epochs: int, step: int, steps: int | None, loss: float) -> None:
    """A one-line progress bar on a terminal: epoch, steps done, running loss."""
    if steps:
        done = int(30 * step / steps)
        bar = f"[{'#' * done}{'.' * (30 - done)}] {step}/{steps}"
    else:
        bar = f"step {step}"
    sys.stderr.write(f"\r\033[Kepoch {epoch + 1}/{epochs} {bar} loss {loss:.4f}")
    sys.stderr.flush()


def _distributed(model: nn.Module) -> nn.Module:
    """Under torch.distributed (torchrun), a DDP wrapper: gradients are averaged across ranks and
    buffers broadcast from rank 0 at every forward. Otherwise the model itself."""
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def _split_batch(batch, targets_from: nn.Module | None):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 1 else batch
    if targets_from is None:
        raise TrainingError("batches carry no labels and no model was given to label them: pass "
                            "(inputs, targets) batches")
    with torch.no_grad():
        was = targets_from.training
        targets_from.eval()
        targets = targets_from(inputs).argmax(1)
        targets_from.train(was)
    return inputs, targets


def _save(path: str, model, optimizer, epoch: int, step: int, history: History) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
             "rng": torch.get_rng_state(), "history": [list(r.items()) for r in history.epochs]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: str, model, optimizer):
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    history = History([dict(r) for r in state["history"]])
    return state["epoch"], state["step"], history


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, loss_fn: Callable | None = None) -> dict:
    """Mean loss and top-1 accuracy in eval mode (the model's mode is restored)."""

    loss_fn = loss_fn or nn.CrossEntropyLoss()
    seen, correct, loss_sum = 0, 0, 0.0
    with eval_mode(model):
        for inputs, targets in data:
            out = model(inputs)
            loss_sum += float(loss_fn(out, targets)) * len(targets)
            correct += int((out.argmax(1) == targets).sum())
            seen += len(targets)
    if seen == 0:
        raise TrainingError("the evaluation data is empty")
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "samples": seen}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Iterable, batches: int = 50) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on `batches` batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, m.training) for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    used = 0
    try:
        for inputs, _ in data:
            if used >= batches:
                break
            model(inputs)
            used += 1
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        for m, flag in modes:
            m.training = flag
    if used == 0:
        raise TrainingError("BN recalibration got no batches")
    return used


__all__ = ["History", "SCHEDULES", "TrainConfig", "TrainingError", "evaluate", "lr_factor", "recalibrate_bn",
           "train"]
