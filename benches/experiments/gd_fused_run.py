"""A whole Gate Decorator (or GAL) run with and without ``fused_kernels`` (compact regions): what a
user's `fxprune.compress` call gains, not one training step.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python -m benches.experiments.gd_fused_run --model mobilenetv2_mini --threads 2
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python -m benches.experiments.gd_fused_run --method gal --model resnet56 --flops 0.5

Gate Decorator: the schedule of the evidence spec's runs (p 0.15, T 4, Ticks on 500 images, a
one-epoch Tock on 2,000, no fine-tune) to `--flops` of the MACs. GAL: the evidence spec's
``gal_channel`` options (4 epochs, masks stepped every 2nd iteration, lr 0.01, lam 0.6, target
reached at 30 % of the run, no fine-tune) on 2,000 unlabelled images. Synthetic MNIST-shaped data
(seeded; the point is time, not accuracy). Whole runs cannot be interleaved, so they alternate
plain, fused, fused, plain (`--pairs` times) and the medians are compared; each result's MACs
ratio is printed (float32 rounding may pick a different unit at the end).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxprune
from fxprune.nets import NETS


def _loader(n: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def run_once(model_name: str, flops: float, fused: bool, method: str = "gate_decorator") -> tuple[float, float]:
    """Seconds of one `fxprune.compress` call and the MACs ratio it reached."""
    torch.manual_seed(0)
    model = NETS[model_name]()
    x = torch.randn(2, 1, 28, 28)
    if method == "gal":
        options = dict(structures=["channel"], epochs=4, mask_step=2, lr=0.01, lam=0.6, target_at=0.3,
                       lr_milestones=[0.6, 0.9], finetune_epochs=0, fused_kernels=fused)
        data = [xb for xb, _ in _loader(2000, 64, 0)]
    else:
        options = dict(p=0.15, T=4, tock_epochs=1, finetune_epochs=0, fused_kernels=fused,
                       tock_data=_loader(2000, 64, 1))
        data = _loader(500, 64, 0)
    t0 = time.perf_counter()
    slim = fxprune.compress(model, method, x, flops, data=data, options=options)
    seconds = time.perf_counter() - t0
    return seconds, slim.fxprune_report.macs_ratio


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="gate_decorator", choices=("gate_decorator", "gal"))
    ap.add_argument("--model", default="mobilenetv2_mini", choices=sorted(NETS))
    ap.add_argument("--flops", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=1, help="plain, fused, fused, plain: this many times")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.pairs):
        for fused in (False, True, True, False):
            s, macs = run_once(args.model, args.flops, fused, args.method)
            times[fused].append(s)
            print(f"{args.method} {args.model}: fused_kernels={fused}: {s:.1f} s, MACs {macs:.4f}", flush=True)
    plain, fused = (statistics.median(times[k]) for k in (False, True))
    print(f"\n{args.method} {args.model}, flops {args.flops}, {args.threads} threads: plain {plain:.1f} s, "
          f"fused_kernels {fused:.1f} s, {plain / fused:.2f}x")


if __name__ == "__main__":
    main()
