"""Whole residual blocks under a latency target: `blocks=True` against channels alone.

For each model and latency target, `fxprune.compress(m, "l1", x, flops=1.0, latency=L, blocks=B,
batch=N)` with B False and True: the MACs kept, compress's own side-by-side measured ratio
(slim / original, `details["latency"]`), the predicted ratio, the blocks removed and the Conv2d
count. One JSON line per run on stdout (and, with ``--json``, all of them in one file); an
unreachable target is a line with the best value the selection predicted.

Usage (docs/benchmarks.md, "Whole blocks under a latency target")::

    python -m benches.experiments.blocks_latency --models resnet50,mobilenet_v2 --batch 1 --threads 1
    python -m benches.experiments.blocks_latency --batch 32 --threads 1 --json docs/blocks_latency_b32.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torchvision

import fxprune
from fxprune.errors import LatencyUnreachableError

MODELS = "resnet50,mobilenet_v2,efficientnet_b0,regnet_y_800mf,convnext_tiny"


def convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def run(name: str, latency: float, blocks: bool, batch: int, size: int) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    row = {"model": name, "latency": latency, "blocks": blocks, "batch": batch, "convs_original": convs(model)}
    t = time.perf_counter()
    try:
        slim = fxprune.compress(model, "l1", x, flops=1.0, latency=latency, blocks=blocks, batch=batch)
    except LatencyUnreachableError as exc:
        row.update(error="unreachable", best=exc.best_s / exc.original_s if exc.original_s else None)
    else:
        d = slim.fxprune_report.details["latency"]
        row.update(macs=slim.fxprune_report.macs_ratio, measured=d["measured_after_s"] / d["measured_before_s"],
                   predicted=d["predicted_after_s"] / d["measured_before_s"], convs=convs(slim),
                   removed_blocks=len(d.get("removed_blocks", [])),
                   rounds=[{k: v for k, v in r.items() if k != "budget_s"} | {"budget": r["budget_s"] / d["measured_before_s"]}
                           for r in d.get("rounds", [])])
    row["seconds"] = time.perf_counter() - t
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", help="write every row and the setting to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = {"command": "python -m benches.experiments.blocks_latency " + " ".join(argv or sys.argv[1:]),
               "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "dtype": "float32",
               "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    rows = []
    for name in args.models.split(","):
        for latency in (float(t) for t in args.targets.split(",")):
            for blocks in (False, True):
                rows.append(run(name.strip(), latency, blocks, args.batch, args.size))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": setting, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
