"""Run the cells of a spec: one JSON record per (experiment, method, target, seed), resumable.

Per seed, every method of an experiment starts from the same trained baseline (cached under
``<out>/baselines``), sees the same data subsets in the same order, and every pruned model gets the
same fine-tune (and, for ``scratch``, the same from-scratch training). Methods run with their own
post-pruning training switched off (`_NO_OWN_FINETUNE`), so the shared fine-tune is the only one.
A record already on disk is not run again; a failing run writes a record with its ``error`` and the
batch goes on.
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import time
import traceback
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import fxprune
from fxprune import data as fxdata
from fxprune.methods.metapruning import pretrain
from fxprune.nets import NETS
from fxprune.passes.pruningnet import reinitialize
from fxprune.train import TrainConfig, evaluate, train

from .spec import DISJOINT_ROLES, Experiment, MethodSpec, Spec

_NO_OWN_FINETUNE = {"gate_decorator": {"finetune_epochs": 0}, "gal": {"finetune_epochs": 0},
                    "metapruning": {"final": "none"}}
BUDGET_TOLERANCE = 0.01  # a compared model's MACs within 1 % of the target


# -- data ---------------------------------------------------------------------------------------
def synthetic(n: int, seed: int) -> TensorDataset:
    """Ten noisy 28x28 class templates: a data set any method learns in seconds (tests)."""
    g = torch.Generator().manual_seed(1000)
    templates = torch.nn.functional.interpolate(torch.randn(10, 1, 7, 7, generator=g).sign(), size=28)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(templates[y] + torch.randn(n, 1, 28, 28, generator=g), y)


class Data:
    """The training pool (a fixed permutation of the train split) and the test split, as tensors
    on the spec's device (``settings.device``: batches are then made there, no copies per step)."""

    def __init__(self, spec: Spec):
        s = spec.settings
        self.batch = int(s.get("batch", 128))
        self.device = torch.device(s.get("device", "cpu"))
        sizes = [spec.sizes("full"), *(spec.sizes(e.data) for e in spec.experiments)]
        # the training roles are prefixes of the pool; the disjoint ones come after the longest prefix
        self.prefix = max(v for s in sizes for k, v in s.items() if k not in DISJOINT_ROLES)
        largest = self.prefix + max((s.get(k, 0) for s in sizes for k in DISJOINT_ROLES), default=0)
        if s.get("dataset", "mnist") == "synthetic":
            pool, test = synthetic(largest, 1), synthetic(int(s["test_images"]), 2)
        else:
            train_set = fxdata.mnist("train")
            perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1234))[:largest]
            pool = TensorDataset(*(t[perm] for t in train_set.tensors))
            test = TensorDataset(*(t[:int(s["test_images"])] for t in fxdata.mnist("test").tensors))
        self.pool, self.test = (TensorDataset(*(t.to(self.device) for t in ds.tensors)) for ds in (pool, test))

    def loader(self, n: int, seed: int, labelled: bool = True, disjoint: bool = False) -> DataLoader:
        """The first `n` pool images (`disjoint`: the `n` after every training role's), shuffled by
        `seed`; inputs only when not `labelled`."""
        start = self.prefix if disjoint else 0
        subset = Subset(self.pool, range(start, start + n))
        if not labelled:
            subset = _InputsOnly(subset)
        return DataLoader(subset, batch_size=self.batch, shuffle=True, generator=torch.Generator().manual_seed(seed))

    def test_loader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=1000)


class _InputsOnly(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0]


# -- training -----------------------------------------------------------------------------------
def _config(table: dict, seed: int) -> TrainConfig:
    t = dict(table)
    t.pop("images", None)
    if "milestones" in t:
        t["milestones"] = tuple(t["milestones"])
    return TrainConfig(seed=seed, progress=False, **t)


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    os.replace(tmp, path)


def baseline(spec: Spec, data: Data, model_name: str, seed: int, out: Path):
    """The trained baseline of `model_name` for `seed` (cached: trained once per spec and seed),
    on the data's device."""
    sched = spec.schedule("baseline")
    n = spec.sizes("full")["baseline"]
    tag = spec.digest(model_name, sched, n)
    weights, info = out / "baselines" / f"{model_name}-s{seed}-{tag}.pt", out / "baselines" / f"{model_name}-s{seed}-{tag}.json"
    weights.parent.mkdir(parents=True, exist_ok=True)
    with open(weights.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runner processes never train the same baseline twice
        return _trained_baseline(model_name, seed, data, n, sched, weights, info)


def _trained_baseline(model_name, seed, data, n, sched, weights: Path, info: Path):
    torch.manual_seed(seed)
    model = NETS[model_name]().to(data.device)
    if weights.exists() and info.exists():
        model.load_state_dict(torch.load(weights, weights_only=True, map_location=data.device))
        return model.eval(), json.loads(info.read_text())
    t0 = time.perf_counter()
    cfg = _config(sched, seed)
    cfg.checkpoint = str(weights.with_suffix(".ckpt"))  # an interrupted baseline resumes at its last epoch
    train(model, data.loader(n, seed), cfg)
    model.eval()
    record = {"accuracy": evaluate(model, data.test_loader())["accuracy"], "seconds": time.perf_counter() - t0}
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    _write_json(info, record)
    Path(cfg.checkpoint).unlink(missing_ok=True)
    return model, record


def _method_options(ms: MethodSpec, target: float, seed: int, loaders: dict) -> dict:
    opts = {**ms.options, **_NO_OWN_FINETUNE.get(ms.method, {}), "seed": seed}
    if ms.tock_data:
        opts["tock_data"] = loaders[ms.tock_data]
    if ms.search_data:
        opts["search_data"] = loaders[ms.search_data]
    if ms.band is not None:
        opts["min_flops"] = (1 - ms.band) * target
    return opts


def _summary(method: str, details: dict) -> dict:
    """What a record keeps of a method's details (the rest is large and per-step)."""
    if method == "gate_decorator":
        return {"ticks": len(details.get("ticks", []))}
    if method == "gal":
        return {k: details.get(k) for k in ("reached_by", "removed_blocks", "removed_branches", "lam_final", "widths")}
    if method == "metapruning":
        search = details.get("search", {})
        history = search.get("history", [])
        training = details.get("pruningnet_training") or []
        return {"widths": details.get("widths"), "search_best_accuracy": search.get("best", {}).get("accuracy"),
                "first_generation_mean_accuracy": history[0].get("mean_accuracy") if history else None,
                "pruningnet_train_accuracy": training[-1]["accuracy"] if isinstance(training, list) and training else None,
                "pruningnet_heldout": details.get("pruningnet_heldout"),
                "pruningnet_shared": details.get("pruningnet_training") == "reused",
                "evaluated": search.get("evaluated"), "rejected": search.get("rejected")}
    return {}


_PRUNINGNETS: dict = {}


def _shared_pruningnet(key: tuple, base, x, data, options: dict, targets: tuple, band: float | None):
    """The PruningNet of (experiment, method, seed), trained on first use (the latest one kept) for
    every target of the experiment: its rounds' check probes structures feasible at each target
    (within the search's band) and ``pruningnet_sampling="feasible"`` trains on them."""
    if key not in _PRUNINGNETS:
        _PRUNINGNETS.clear()
        _PRUNINGNETS[key] = pretrain(base, x, data, {k: v for k, v in options.items() if k != "min_flops"},
                                     flops=targets, band=band)
    return _PRUNINGNETS[key]


def run_one(spec: Spec, data: Data, exp: Experiment, ms: MethodSpec, target: float, seed: int, out: Path) -> dict:
    """Compress the seed's baseline with one method at one target, then the evaluations of `exp.after`."""
    base, base_info = baseline(spec, data, exp.model, seed, out)
    sizes = spec.sizes(exp.data)
    loaders = {role: data.loader(sizes[role], seed + 100, labelled=role != "unlabelled", disjoint=role in DISJOINT_ROLES)
               for role in ("method", "tick", "unlabelled", "baseline", *DISJOINT_ROLES) if role in sizes}
    x = torch.randn(1, 1, 28, 28, device=data.device)
    record = {"experiment": exp.name, "model": exp.model, "method": ms.key, "fxprune_method": ms.method,
              "target": target, "seed": seed, "data": exp.data, "device": str(data.device),
              "baseline_accuracy": base_info["accuracy"],
              "accuracy": {}, "seconds": {}}
    t0 = time.perf_counter()
    kwargs = {}
    if ms.data is not None:
        kwargs = {"data": loaders[ms.data], "options": _method_options(ms, target, seed, loaders)}
    if ms.method == "metapruning":  # one PruningNet per seed serves every target, as the authors' search
        kwargs["options"]["pruningnet"] = _shared_pruningnet((exp.name, ms.key, seed), base, x, loaders[ms.data],
                                                             kwargs["options"], exp.targets, ms.band)
    slim = fxprune.compress(base, ms.method, x, target, seed=seed, **kwargs)
    record["seconds"]["compress"] = time.perf_counter() - t0
    report = slim.fxprune_report
    record.update(macs_ratio=report.macs_ratio, params_ratio=report.params_after / report.params_before,
                  macs=report.macs_after, flops=2 * report.macs_after, params=report.params_after,
                  budget_ok=abs(report.macs_ratio / target - 1) <= BUDGET_TOLERANCE,
                  summary=_summary(ms.method, report.details or {}))
    test = data.test_loader()
    if "none" in exp.after:
        record["accuracy"]["none"] = evaluate(slim, test)["accuracy"]
    if "finetune" in exp.after:
        t1, tuned = time.perf_counter(), copy.deepcopy(slim)
        train(tuned, data.loader(sizes["finetune"], seed + 200), _config({**spec.schedule("finetune"), **exp.finetune}, seed))
        record["accuracy"]["finetune"] = evaluate(tuned, test)["accuracy"]
        record["seconds"]["finetune"] = time.perf_counter() - t1
    if "scratch" in exp.after:
        t1, fresh = time.perf_counter(), copy.deepcopy(slim)
        reinitialize(fresh, seed)
        train(fresh, data.loader(spec.sizes("full")["baseline"], seed + 300), _config(spec.schedule("scratch"), seed))
        record["accuracy"]["scratch"] = evaluate(fresh, test)["accuracy"]
        record["seconds"]["scratch"] = time.perf_counter() - t1
    return record


def record_path(out: Path, exp: Experiment, key: str, target: float, seed: int) -> Path:
    return out / "runs" / exp.name / f"{key}-t{target:g}-s{seed}.json"


def run_all(spec: Spec, out: Path, only: list | None = None, seeds: tuple | None = None, deadline: float | None = None,
            log=print, threads: int | None = None) -> list[Path]:
    """Every missing record of the spec (or of the experiments in `only`, in that order), in spec
    order. Stops starting new runs after `deadline` (time.time()); returns the paths written.
    Several processes may share `out` (baselines are trained under a file lock, records written
    atomically), e.g. two one-thread processes on two cores."""
    torch.set_num_threads(threads or int(spec.settings.get("threads", torch.get_num_threads())))
    data, written = Data(spec), []
    experiments = [e for name in only for e in spec.experiments if e.name == name] if only else spec.experiments
    for exp in experiments:
        for seed in seeds or exp.seeds:
            for target in exp.targets:
                for key in exp.methods:
                    path = record_path(out, exp, key, target, seed)
                    if path.exists():
                        continue
                    if deadline is not None and time.time() > deadline:
                        log(f"deadline reached: {path.name} and later runs left for the next call (resumable)")
                        return written
                    t0 = time.perf_counter()
                    try:
                        record = run_one(spec, data, exp, spec.methods[key], target, seed, out)
                    except Exception as exc:  # a failing cell is recorded and the batch goes on
                        record = {"experiment": exp.name, "model": exp.model, "method": key, "target": target,
                                  "seed": seed, "data": exp.data, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc(limit=8)}
                    record["wall_seconds"] = time.perf_counter() - t0
                    record["threads"] = torch.get_num_threads()
                    _write_json(path, record)
                    written.append(path)
                    acc = record.get("accuracy", {})
                    log(f"{exp.name} {key} t={target:g} seed={seed}: "
                        + (record["error"] if "error" in record else
                           f"MACs {record['macs_ratio']:.4f} acc {acc} ({record['wall_seconds']:.0f} s)"))
    return written


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
