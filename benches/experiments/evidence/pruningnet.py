"""MetaPruning's PruningNet alone, as the evidence runner trains it: held-out accuracy per round.

    python -m benches.experiments.evidence.pruningnet [--only metapruning_scratch,resnet56_10] [--seeds 0,1,2]

For every experiment of the spec that runs a ``metapruning`` method, and every seed: the seed's
baseline (the runner's, cached under ``<out>/baselines``), the method's data and options exactly
as `run.run_one` gives them, and `fxprune.methods.metapruning.pretrain` with the experiment's
targets and band — the PruningNet a rerun of those cells trains (same seed, data, split and
options). Each round's check scores `pruningnet_probe` structures feasible at each target on the
held-out split; one JSON per (experiment, method, seed) under ``<out>/pruningnet`` keeps the
rounds (per-target accuracies, min / median, training seconds), and a table of the last rounds
is printed. No search, no fine-tune: this is the check of issue 18's "PruningNet reaches >= 95 %
on held-out training images for sampled structures".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from fxprune.methods.metapruning import pretrain

from .run import Data, _method_options, _write_json, baseline
from .spec import DEFAULT_SPEC, load_spec

ROOT = Path(__file__).resolve().parents[3]


def run(spec, out: Path, only=None, seeds=None, log=print) -> list[dict]:
    data, rows = Data(spec), []
    for exp in spec.experiments:
        if only and exp.name not in only:
            continue
        for key in exp.methods:
            ms = spec.methods[key]
            if ms.method != "metapruning":
                continue
            for seed in seeds or exp.seeds:
                path = out / "pruningnet" / f"{exp.name}-{key}-s{seed}.json"
                if path.exists():
                    rows.append(json.loads(path.read_text()))
                    continue
                base, _ = baseline(spec, data, exp.model, seed, out)
                loader = data.loader(spec.sizes(exp.data)[ms.data], seed + 100)
                opts = {k: v for k, v in _method_options(ms, exp.targets[0], seed, {}).items() if k != "min_flops"}
                t0 = time.perf_counter()
                net = pretrain(base, torch.randn(1, 1, 28, 28, device=data.device), loader, opts,
                               flops=exp.targets, band=ms.band)
                record = {"experiment": exp.name, "model": exp.model, "method": key, "seed": seed,
                          "targets": list(exp.targets), "band": ms.band, "options": {k: v for k, v in opts.items()},
                          "images": len(loader.dataset), "rounds": net.heldout,
                          "train_accuracy": [e["accuracy"] for e in net.history.epochs],
                          "seconds": time.perf_counter() - t0}
                _write_json(path, record)
                rows.append(record)
                log(f"{exp.name} {key} seed {seed}: " + "; ".join(
                    f"{r['epochs']} epochs {r['heldout_accuracy']:.3f}" for r in net.heldout))
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        last = r["rounds"][-1]
        for t in last["per_target"]:
            acc = t["accuracy"]
            lines.append([r["model"], r["seed"], t["flops"], len(acc), f"{min(acc):.3f}",
                          f"{statistics.median(acc):.3f}", f"{statistics.mean(acc):.3f}", last["epochs"],
                          " / ".join(f"{x['heldout_accuracy']:.3f}" for x in r["rounds"]),
                          f"{last['seconds'] / 60:.0f}", f"{r['seconds'] / 60:.0f}"])
    return tabulate(lines, headers=["model", "seed", "target", "structures", "min", "median", "mean", "epochs",
                                    "check per round", "train min", "wall min"], tablefmt="github")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.experiments.evidence.pruningnet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(DEFAULT_SPEC))
    p.add_argument("--only", default="", help="comma-separated experiment names (default: every one with metapruning)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the spec's)")
    p.add_argument("--out", default=str(ROOT / "benches" / "results" / "evidence"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    only = [s for s in args.only.split(",") if s] or None
    seeds = tuple(int(s) for s in args.seeds.split(",") if s) or None
    rows = run(spec, Path(args.out), only, seeds, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
