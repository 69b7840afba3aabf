"""Gate Decorator at small scale on real MNIST; writes docs/results.md.

Run: ``python benches/experiments/gate_decorator_mnist.py [--quick]`` (about 30 minutes on a 2-core CPU).

A CIFAR-style ResNet-20 (option-B shortcuts, 1x28x28 input) is trained from scratch, then pruned
to 40% and 30% of its MACs with Gate Decorator's One-shot, Tick-only and Tick-Tock schedules and
with the core's data-free `l1` and `uniform`, every pruned model fine-tuned with the same budget.

Scaled schedule (authors' ResNet-56/CIFAR-10 schedule in brackets):
baseline 3 epochs on 20k images, cosine LR from 0.05 [160 epochs, step 0.1/0.01/0.001]; Tick = 1 pass over a
2k-image subset at lr 1e-3 [full train set]; p = 0.05 of the remaining units per Tick [0.002];
a Tock every T = 5 Ticks = 1 epoch on a 5k subset, triangular 1e-3 -> 1e-2 -> 1e-3, L1 1e-3 on
the gates [10 epochs on everything, T = 10]; fine-tune 1 epoch on 20k, triangular, momentum 0
[40 epochs]. min keep 10% per group, weight decay 5e-4 everywhere (as the authors).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader, Subset

import fxprune
from fxprune import data as fxdata
from fxprune.models import build_model
from fxprune.train import TrainConfig, evaluate, train


def loader(ds, n, bs=128, seed=0):
    return DataLoader(Subset(ds, range(n)), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


def finetune(model, data, epochs):
    train(model, data, TrainConfig(epochs=epochs, lr=1e-2, schedule="triangular", peak_at=0.5, lr_min_ratio=0.1,
                                   momentum=0.0, progress=False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    n_train, n_tick, n_tock, base_epochs = (2000, 500, 1000, 1) if args.quick else (20000, 2000, 5000, 3)
    train_set, test_set = fxdata.mnist("train"), fxdata.mnist("test")
    test = DataLoader(test_set, batch_size=1000)
    start = time.time()
    base = build_model("fxprune:resnet20")
    train(base, loader(train_set, n_train), TrainConfig(epochs=base_epochs, lr=0.05, schedule="cosine",
                                                        progress=False))
    base.eval()
    base_acc = evaluate(base, test)["accuracy"]
    x = torch.randn(1, 1, 28, 28)
    rows = [["baseline", "-", f"{base_acc:.4f}", "-", fxprune.report.human(fxprune.analyze(base, x).cost.total_macs),
             "1.000", f"{sum(p.numel() for p in base.parameters()) / 1e3:.1f}K", f"{time.time() - start:.0f}"]]
    ft = loader(train_set, n_train, seed=1)
    for target in (0.4, 0.3):
        for method, schedule in (("gate_decorator", "one_shot"), ("gate_decorator", "tick_only"),
                                 ("gate_decorator", "tick_tock"), ("l1", None), ("uniform", None)):
            t0 = time.time()
            if method == "gate_decorator":
                opts = dict(schedule=schedule, p=0.05, T=5, tock_epochs=1, finetune_epochs=0)
                data = loader(train_set, n_tick, seed=2)
                if schedule == "tick_tock":  # Tocks see more data than Ticks
                    opts["tock_data"] = loader(train_set, n_tock, seed=3)
                slim = fxprune.compress(base, method, x, target, data=data, options=opts)
            else:
                slim = fxprune.compress(base, method, x, target)
            before_ft = evaluate(slim, test)["accuracy"]
            finetune(slim, ft, 1)
            r = slim.fxprune_report
            rows.append([f"{method}" + (f" / {schedule}" if schedule else ""), target, f"{evaluate(slim, test)['accuracy']:.4f}",
                         f"{before_ft:.4f}", fxprune.report.human(r.macs_after), f"{r.macs_ratio:.3f}",
                         f"{r.params_after / 1e3:.1f}K", f"{time.time() - t0:.0f}"])
            print(rows[-1], file=sys.stderr)
    table = tabulate(rows, headers=["method", "target MACs", "test acc (after FT)", "acc before FT", "MACs",
                                    "MACs ratio", "params", "seconds"], tablefmt="github", disable_numparse=True)
    with open(args.out, "a") as f:
        f.write(f"\n## Gate Decorator on real MNIST ({time.strftime('%Y-%m-%d')})\n\n"
                f"`python benches/experiments/gate_decorator_mnist.py{' --quick' if args.quick else ''}` on "
                f"{platform.machine()}, "
                f"2 threads, torch {torch.__version__}; wall time {time.time() - start:.0f} s. "
                "ResNet-20 (option B), test set = the 10k MNIST test split; every pruned model gets the same "
                "1-epoch fine-tune. Schedule: see the script's docstring (scaled from the authors').\n\n"
                + table + "\n")


if __name__ == "__main__":
    main()
