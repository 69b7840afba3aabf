"""GAL at small scale on real MNIST; appends a section to docs/results.md.

Run: ``python benches/experiments/gal_mnist.py [--quick] [--only lenet,resnet,inception] [--threads N]``
(about 30 minutes on this 2-core CPU with 1 thread).

Experiments (every model trained from scratch here: no pretrained weights):
* LeNet-5 (20-50-500-10) with channel masks on conv1/conv2 and neuron masks on fc1, FLOPs target
  25% (our bar: at most 1.0% test error at at most 25% of the baseline FLOPs);
* CIFAR-style ResNet-20 (option-B shortcuts) with block masks only, and jointly block + channel;
* a small Inception net (`fxprune:inception_mini`, 2 modules x 4 branches) with branch masks.
GAL itself never sees a label (the generator learns from the baseline's logits and the
discriminator); the labels are used for the baseline's training, the optional fine-tune after
pruning and the test accuracy.

Scaled schedule (authors' CIFAR-10 settings in brackets). Baselines: LeNet 6 epochs on the 50k
training split, ResNet-20 / Inception-mini 2 epochs on 10k, SGD cosine from 0.05. GAL: LeNet 3
epochs on 50k, ResNet-20 / Inception-mini 3 epochs on 5k [100 epochs on all 50k], batch 128 [128], lr 0.01 for generator, discriminator
and FISTA with x0.1 at 30/60/90% of the run [epochs 30/60/90], FISTA every 20 iterations for
LeNet (~60 steps), every 4 for the others (~30 steps) [every 200: ~2000 steps],
lam starting at the authors' value and steered towards the FLOPs target (see `fxprune/gal.py`)
[fixed lam, no FLOPs target], mu 1 [1 for ResNet, 0.1 for VGG/GoogLeNet]; fine-tune 1-2 epochs of
cross-entropy, SGD lr 1e-2 cosine: LeNet 6 epochs on 50k, the others 1 epoch on 10k [100 epochs
at 1e-4 / 1e-5]. LeNet is run three times: FLOPs-weighted L1 (exponent 0.5) with our MLP discriminator, the same
with the authors' linear discriminator, and the authors' plain L1 with the MLP.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader, Subset

import fxprune
from fxprune import data as fxdata
from fxprune.models import build_model
from fxprune.report import human
from fxprune.train import TrainConfig, evaluate, train

X = torch.randn(1, 1, 28, 28)


def loader(ds, n, bs=128, seed=0):
    return DataLoader(Subset(ds, range(n)), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


def baseline(spec, data, epochs, lr):
    model = build_model(spec)
    train(model, data, TrainConfig(epochs=epochs, lr=lr, schedule="cosine", progress=False))
    return model.eval()


def finetune(model, data, epochs):
    train(model, data, TrainConfig(epochs=epochs, lr=1e-2, schedule="cosine", progress=False))
    model.eval()


def run_gal(base, target, data, ft_data, test, ft_epochs, **options):
    t0 = time.time()
    slim = fxprune.compress(base, "gal", X, target, data=data, options=options)
    gal_seconds = time.time() - t0
    before = evaluate(slim, test)["accuracy"]
    if ft_epochs:
        finetune(slim, ft_data, ft_epochs)
    after = evaluate(slim, test)["accuracy"]
    r = slim.fxprune_report
    d = r.details
    widths = "-".join(str(k) for k, _ in d["widths"].values()) if d["widths"] else "-"
    label = "+".join(options["structures"])
    if options.get("flops_weighted"):
        label += f", FLOPs-weighted L1 (p={options['flops_weighted']})"
    label += f", {options.get('discriminator', 'mlp')} D"
    return {"structures": label, "target": target, "acc_gal": before, "acc_ft": after,
            "macs": r.macs_after, "macs_ratio": r.macs_ratio, "params": r.params_after,
            "params_ratio": r.params_after / r.params_before, "blocks_removed": len(d["removed_blocks"]),
            "blocks": d["masks"]["blocks"], "branches_removed": len(d["removed_branches"]),
            "branches": d["masks"]["branches"], "widths": widths, "reached_by": d["reached_by"],
            "lam_final": d["lam_final"], "max_rel_error": r.max_rel_error, "seconds": gal_seconds,
            "removed": d["removed_blocks"] + d["removed_branches"]}


def experiment(name, spec, train_set, test, sizes, runs, quick):
    n_base, base_epochs, base_lr, n_gal, gal_epochs, ft_epochs, mask_step = sizes
    t0 = time.time()
    base = baseline(spec, loader(train_set, n_base), base_epochs, base_lr)
    acc = evaluate(base, test)["accuracy"]
    an = fxprune.analyze(base, X)
    out = {"model": name, "baseline_acc": acc, "baseline_macs": an.cost.total_macs,
           "baseline_params": an.cost.total_params, "baseline_seconds": time.time() - t0, "runs": []}
    print(f"{name} baseline {acc:.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    for target, options in runs:
        options = {"epochs": gal_epochs, "mask_step": mask_step, **options}
        row = run_gal(base, target, loader(train_set, n_gal, seed=1), loader(train_set, n_base, seed=2), test,
                      ft_epochs, **options)
        out["runs"].append(row)
        print(f"  {row}", file=sys.stderr)
    return out


def tables(results) -> str:
    parts = []
    for res in results:
        rows = [["baseline", "-", f"{100 * (1 - res['baseline_acc']):.2f}", "-", human(res["baseline_macs"]),
                 human(2 * res["baseline_macs"]), "1.000", human(res["baseline_params"]), "-", "-", "-"]]
        for r in res["runs"]:
            removed = []
            if r["blocks"]:
                removed.append(f"{r['blocks_removed']}/{r['blocks']} blocks")
            if r["branches"]:
                removed.append(f"{r['branches_removed']}/{r['branches']} branches")
            rows.append([f"GAL {r['structures']}", r["target"], f"{100 * (1 - r['acc_gal']):.2f}",
                         f"{100 * (1 - r['acc_ft']):.2f}", human(r["macs"]), human(2 * r["macs"]),
                         f"{r['macs_ratio']:.3f}", human(r["params"]), ", ".join(removed) or "-", r["widths"],
                         f"{r['reached_by']} (lam {r['lam_final']:.3g})"])
        parts.append(f"**{res['model']}**\n\n" + tabulate(
            rows, headers=["run", "FLOPs target", "test error % (GAL, no FT)", "test error % (after FT)", "MACs",
                           "FLOPs", "MACs ratio", "params", "removed", "kept widths", "target reached by"],
            tablefmt="github", disable_numparse=True))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--only", default="lenet,resnet,inception")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--json", default="docs/gal_mnist.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    train_set, test_set = fxdata.mnist("train"), fxdata.mnist("test")
    test = DataLoader(test_set, batch_size=1000)
    q = args.quick
    plan = {
        "lenet": ("LeNet-5 (20-50-500)", "fxprune:lenet5",
                  (2000, 1, 0.05, 1000, 1, 1, 2) if q else (50000, 6, 0.05, 50000, 3, 6, 20),
                  [(0.25, {"structures": ("channel",), "flops_weighted": 0.5}),
                   (0.25, {"structures": ("channel",), "flops_weighted": 0.5, "discriminator": "authors"}),
                   (0.25, {"structures": ("channel",)})]),
        "resnet": ("ResNet-20 (option B)", "fxprune:resnet20",
                   (2000, 1, 0.05, 1000, 1, 1, 2) if q else (10000, 2, 0.05, 5000, 3, 1, 4),
                   [(0.6, {"structures": ("block",)}), (0.4, {"structures": ("block", "channel")})]),
        "inception": ("Inception-mini (2 modules x 4 branches)", "fxprune:inception_mini",
                      (2000, 1, 0.05, 1000, 1, 1, 2) if q else (10000, 2, 0.05, 5000, 3, 1, 4),
                      [(0.6, {"structures": ("branch",), "mu": 0.1})]),
    }
    start = time.time()
    results = [experiment(plan[k][0], plan[k][1], train_set, test, plan[k][2], plan[k][3], q)
               for k in args.only.split(",")]
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": args.threads,
                   "results": results}, f, indent=1)
    with open(args.out, "a") as f:
        f.write(f"\n## GAL on real MNIST ({time.strftime('%Y-%m-%d')})\n\n"
                f"`python benches/experiments/gal_mnist.py{' --quick' if q else ''} --only {args.only}` on "
                f"{platform.machine()}, "
                f"{args.threads} thread(s), torch {torch.__version__}; wall time {time.time() - start:.0f} s "
                f"(all numbers in {args.json}). Test set = the 10k MNIST test split; GAL is label-free; each "
                "pruned model is then fine-tuned with cross-entropy. Schedule: see the script's docstring "
                "(scaled from the authors').\n\n" + tables(results) + "\n")


if __name__ == "__main__":
    main()
