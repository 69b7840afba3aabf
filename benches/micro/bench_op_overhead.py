"""Per-call cost of the masked conv op on top of its arithmetic: what the host spends per call.

    python -m benches.micro.bench_op_overhead --device cpu --threads 2
    python -m benches.micro.bench_op_overhead --device cuda        # in benches/gpu_check.sh ("opcall")

Why: on a GPU at batch 64 the ResNet-50 / MobileNetV2 layers of the kernel sweep take 0.03-0.3 ms of
GPU time, and the op's per-call host work (custom-op and autograd dispatch in Python, the
dispatcher, reading the masks) was as long or longer (docs/kernels.md, H200, 2026-11-27); on the
CPU it is what keeps the op over eager conv-then-multiply at density 1 on the small layers. Each
row times, in one process and interleaved (medians of ``--rounds`` rounds of ``--round-time``
seconds each; on CUDA the loop synchronises once per round, so the host may run ahead as it does
in a network), a plain conv, eager conv-then-multiply, the op reading its masks, and the op handed
its masks' live indices (``out_live``, what the fused pass gives it with ``cache_live=True``: no
mask read, no host synchronisation), forward alone and forward + backward. On a tiny layer (the
first rows) the time is the host's per-call cost; on the larger one it shows whether the host or
the arithmetic bounds a call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fxprune.kernels import masked_conv2d

# name: (batch, channels, hw, kernel)
SHAPES = {"tiny 1x1": (1, 8, 4, 1), "r50.l3.3x3 b8": (8, 256, 14, 3)}
DENSITIES = (1.0, 0.5)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def calls(shape, density: float, device: str, backward: bool) -> dict:
    """The four callables of one row (each one forward, or one forward + backward)."""
    n, c, hw, k = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen).to(device).requires_grad_(backward)
    w = (torch.randn(c, c, k, k, generator=gen) * 0.05).to(device).requires_grad_(backward)
    b = torch.randn(c, generator=gen).to(device).requires_grad_(backward)
    mask = torch.zeros(c)
    mask[torch.randperm(c, generator=gen)[:max(1, round(density * c))]] = 1.0
    mask = mask.to(device)
    live = mask.nonzero().reshape(-1)
    pad = k // 2
    forwards = {
        "conv": lambda: F.conv2d(x, w, b, 1, pad),
        "eager": lambda: F.conv2d(x, w, b, 1, pad) * mask.reshape(1, -1, 1, 1),
        "op": lambda: masked_conv2d(x, w, b, mask, 1, pad),
        "op, live given": lambda: masked_conv2d(x, w, b, mask, 1, pad, out_live=live),
    }
    if not backward:
        return forwards

    def step(fwd):
        def run():
            x.grad = w.grad = b.grad = None
            fwd().sum().backward()
        return run

    return {name: step(fwd) for name, fwd in forwards.items()}


def measure(fns: dict, device: str, rounds: int, round_time: float) -> dict:
    """Seconds per call of each callable: medians over interleaved rounds."""
    number = {}
    for name, fn in fns.items():  # warm-up (the dispatcher measures here), then calls per round
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        number[name] = max(1, int(round_time / max(time.perf_counter() - t0, 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(number[name]):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / number[name])
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--round-time", type=float, default=0.1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"{where}; torch {torch.__version__}; float32, NCHW; microseconds per call, medians of {args.rounds} "
          f"interleaved rounds\n")
    print("| layer | density | pass | conv | eager conv*mask | op | op, live given | op - eager | "
          "op, live given - eager |\n|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        for density in DENSITIES:
            for backward in (False, True):
                t = measure(calls(shape, density, args.device, backward), args.device, args.rounds, args.round_time)
                us = {k: v * 1e6 for k, v in t.items()}
                print(f"| {name} | {density:.2f} | {'fwd+bwd' if backward else 'fwd'} | {us['conv']:.1f} | "
                      f"{us['eager']:.1f} | {us['op']:.1f} | {us['op, live given']:.1f} | "
                      f"{us['op'] - us['eager']:+.1f} | {us['op, live given'] - us['eager']:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
