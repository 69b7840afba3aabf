"""MetaPruning at small scale on real MNIST; appends a section to docs/results.md.

Run: ``nice python benches/experiments/metapruning_mnist.py [--quick]`` (about 25 minutes on one CPU thread).

The paper's claim, scaled down: at the same FLOPs, the structure MetaPruning's search finds beats
uniform width scaling when both are trained from scratch with the same budget. A CIFAR-style
ResNet-20 (option-B shortcuts, 1x28x28 input, 12 width variables: 3 stage streams tied by the
residual adds + 9 inner widths) gets one PruningNet, trained from scratch; it is searched at 50%
and 25% of the MACs (in the band [target - 0.03, target]: the authors' ResNet search keeps its
FLOPs in a band) and under a latency limit on this CPU (batch 1, one thread); every structure,
MetaPruning's and uniform's, is then re-initialised and trained from scratch with the same
schedule and seeds, and scored on the 10k MNIST test split (the search never sees it: candidates
are scored on a held-out 10% of the training images).

Scaled schedule (authors' ResNet-50/ImageNet schedule in brackets):
PruningNet 3 epochs on 18k images (the other 2k held out), batch 128, SGD momentum 0.9, lr 0.1
decayed linearly to 0, weight decay 1e-4, label smoothing 0.1, a random structure per mini-batch
[32 epochs on ImageNet minus 50k, batch 256, otherwise the same]; search population 16, 6
generations, top-5 parents, 6 mutations (p = 0.1 per gene), 6 crossovers, random fill [50, 20,
10, 25, 25]; BN recalibration on 4 training batches of 128 [100 batches of 1000], scoring on the
2k held-out images [50k sub-validation]; final training from scratch 2 epochs on 20k images,
lr 0.05 decayed linearly, weight decay 1e-4, label smoothing 0.1 [128 epochs, lr 0.1, batch 256].
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import numpy as np
import torch
from tabulate import tabulate
from torch.utils.data import DataLoader, Subset

import fxprune
from fxprune import data as fxdata
from fxprune.latency_model import measure_model, profile_latency
from fxprune.methods.metapruning.method import genome_kept
from fxprune.methods.metapruning.method import pretrain
from fxprune.models import build_model
from fxprune.report import human
from fxprune.train import TrainConfig, evaluate, train
from fxprune.passes.pruningnet import reinitialize
from fxprune import PruningPlan
from fxprune.passes.width_encoding import build_encoding


def loader(ds, n, bs=128, seed=0):
    return DataLoader(Subset(ds, range(n)), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


def from_scratch(slim, data_set, n, epochs, seed, test):
    """Re-initialise and train `slim` (a copy) with the shared schedule; test accuracy."""
    model = copy.deepcopy(slim)
    reinitialize(model, seed)
    train(model, loader(data_set, n, seed=100 + seed),
          TrainConfig(epochs=epochs, lr=0.05, schedule="triangular", peak_at=0.0, weight_decay=1e-4,
                      label_smoothing=0.1, seed=seed, progress=False))
    return evaluate(model, test)["accuracy"]


def row(name, target, slim, accs, inherited, seconds, base):
    macs = fxprune.analyze(slim, torch.randn(1, 1, 28, 28)).cost.total_macs
    params = sum(p.numel() for p in slim.parameters())
    return [name, target, f"{np.mean(accs):.4f}", " / ".join(f"{a:.4f}" for a in accs),
            "-" if inherited is None else f"{inherited:.4f}", human(macs), human(2 * macs), f"{macs / base:.3f}",
            f"{params / 1e3:.1f}K", None, f"{seconds:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--json", default=None, help="also write every number here")
    parser.add_argument("--seeds", type=int, default=2, help="from-scratch trainings per structure")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    q = args.quick
    n_train, pn_epochs, final_epochs = (2000, 1, 1) if q else (20000, 3, 2)
    search = dict(population=6, generations=2, parents=3, mutations=3, crossovers=3, calib_batches=2) if q else \
        dict(population=16, generations=6, parents=5, mutations=6, crossovers=6, calib_batches=4)
    seeds = list(range(1 if q else args.seeds))
    train_set, test_set = fxdata.mnist("train"), fxdata.mnist("test")
    test = DataLoader(test_set, batch_size=1000)
    x = torch.randn(1, 1, 28, 28)
    start = time.time()
    model = build_model("fxprune:resnet20").eval()  # untrained: the PruningNet is trained from scratch
    data = loader(train_set, n_train)
    net = pretrain(model, x, data, dict(epochs=pn_epochs, lr=0.1, weight_decay=1e-4, label_smoothing=0.1))
    pn_seconds = time.time() - start
    out = {"pruningnet": {"seconds": pn_seconds, "epochs": net.history.epochs}, "rows": [], "searches": {}}
    print(f"PruningNet trained in {pn_seconds:.0f}s: {net.history.epochs[-1]}", file=sys.stderr)

    analysis = fxprune.analyze(copy.deepcopy(model), x)
    base = analysis.cost.total_macs
    enc = build_encoding(analysis.channels)
    latency_model = profile_latency(analysis)  # the shared latency model of this CPU (cached)
    calibration = {"offset_s": latency_model.offset, "scale": latency_model.scale, "fit": latency_model.fit}
    rows = []
    t0 = time.time()
    full = fxprune.prune_with_plan(analysis, PruningPlan(keep=enc.keep(enc.full())))[0]
    accs = [from_scratch(full, train_set, n_train, final_epochs, s, test) for s in seeds[:1]]
    rows.append(row("full width", "1.0", full, accs, None, time.time() - t0, base))
    measured = [full]
    print(rows[-1], file=sys.stderr)

    def compare(label, meta, uniform, search_seconds, n_seeds):
        d = meta.fxprune_report.details
        out["searches"][label] = {k: d[k] for k in ("genome", "widths", "macs_ratio", "search", "seconds")}
        out["searches"][label]["latency"] = d.get("latency")
        inherited = evaluate(meta, test)["accuracy"]
        for name, slim, extra in (("metapruning", meta, inherited), ("uniform", uniform, None)):
            t = time.time()
            accs = [from_scratch(slim, train_set, n_train, final_epochs, s, test) for s in seeds[:n_seeds]]
            seconds = time.time() - t + (search_seconds if name == "metapruning" else 0)
            rows.append(row(name, label, slim, accs, extra, seconds, base))
            measured.append(slim)
            print(rows[-1], file=sys.stderr)

    for target in (0.5, 0.25):
        t = time.time()
        meta = fxprune.compress(model, "metapruning", x, target, data=data,
                                options=dict(search, pruningnet=net, min_flops=target - 0.03))
        uniform = fxprune.compress(model, "uniform", x, target)
        compare(f"MACs {target}", meta, uniform, time.time() - t, len(seeds))

    limit = 0.6 * latency_model.original_s
    t = time.time()
    meta = fxprune.compress(model, "metapruning", x, 1.0, data=data, latency=0.6,
                            options=dict(search, pruningnet=net, latency_model=latency_model))
    ratio = max((r for r in np.arange(0.10, 1.0001, 0.01)
                 if latency_model.predict(genome_kept(enc, enc.uniform(r))) <= limit), default=0.1)
    uniform = fxprune.prune_with_plan(analysis, PruningPlan(keep=enc.keep(enc.uniform(ratio))))[0]
    compare(f"latency {limit * 1e3:.3f} ms", meta, uniform, time.time() - t, 1)
    lat = meta.fxprune_report.details["latency"]
    for r, m in zip(rows, measured):
        r[9] = f"{measure_model(m, x) * 1e3:.3f}"

    rng = np.random.default_rng(0)
    genomes = [enc.random(rng) for _ in range(10)]
    slims = [fxprune.prune_with_plan(analysis, PruningPlan(keep=enc.keep(g)), verify_output=False)[0] for g in genomes]
    checks = [(latency_model.predict(genome_kept(enc, g)), measure_model(m, x)) for g, m in zip(genomes, slims)]
    errors = [abs(p - m) / m for p, m in checks]
    out.update(rows=rows, latency={"limit_s": limit, "final": lat, "calibration": calibration,
                                   "random_genomes": [{"predicted_s": p, "measured_s": m} for p, m in checks],
                                   "uniform_ratio": ratio})
    hist = out["searches"]["MACs 0.5"]["search"]["history"]
    wall = time.time() - start
    headers = ["structure", "target", "test acc (mean)", "per seed", "acc with PruningNet weights", "MACs",
               "FLOPs", "MACs ratio", "params", "latency ms (measured)", "seconds"]
    table_md = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    hist_md = tabulate([[h["generation"], h["evaluated"], f"{h['best_accuracy']:.4f}", f"{h['mean_accuracy']:.4f}",
                         f"{h['pool_best_accuracy']:.4f}", f"{h['best_macs_ratio']:.3f}", f"{h['mean_macs_ratio']:.3f}"]
                        for h in hist],
                       headers=["generation", "new candidates", "best acc", "mean acc", "best so far",
                                "MACs ratio of best", "mean MACs ratio"], tablefmt="github", disable_numparse=True)
    widths = {k: ", ".join(f"{w['leading'].rsplit('.', 1)[0]} {w['kept_channels']}/{w['channels']}"
                           for w in v["widths"]) for k, v in out["searches"].items()}
    text = (f"\n## MetaPruning on real MNIST ({time.strftime('%Y-%m-%d')})\n\n"
            f"`nice python benches/experiments/metapruning_mnist.py{' --quick' if q else ''}` on {platform.machine()}, "
            f"1 thread, torch {torch.__version__}; wall time {wall:.0f} s (PruningNet {pn_seconds:.0f} s). "
            "ResNet-20 (option B) on 1x28x28; every structure re-initialised and trained from scratch with the "
            f"same schedule, seeds {seeds} (the full-width reference and the latency pair: seed 0); test set = the "
            "10k MNIST test split, which the search never sees. Latency: batch 1, one thread, fastest of 30 "
            "round-robin rounds over all models. Schedule: see the script's docstring (scaled from the authors')."
            "\n\n" + table_md + "\n\nKept channels per width variable (named by the layer that produces it; "
            "`conv1`, `layer2.0.conv2` and `layer3.0.conv2` are the three residual streams):\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in widths.items())
            + f"\n\nSearch history at 50% MACs:\n\n{hist_md}\n\n"
            f"Latency model (fxprune.latency_model): {len(latency_model.layers())} layers, fit measured = "
            f"{latency_model.offset * 1e3:.3f} ms + {latency_model.scale:.3f} x sum of layers; limit "
            f"{limit * 1e3:.3f} ms (0.6 of the measured original): MetaPruning's structure predicted "
            f"{lat['predicted_after_s'] * 1e3:.3f} ms, measured "
            f"{lat['measured_after_s'] * 1e3:.3f} ms; on 10 random structures |predicted - measured| / measured is "
            f"{np.mean(errors):.1%} on average, {max(errors):.1%} at most. Uniform at that latency: ratio "
            f"{ratio:.2f}.\n")
    with open(args.out, "a") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(text)


if __name__ == "__main__":
    main()
