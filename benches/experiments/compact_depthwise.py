"""Compact regions through depthwise convs: a Gate Decorator / frozen-GAL training step of a
MobileNetV2-style net with the depthwise producers compact (since 2026-12-08) against the same
regions with them left out (what `fuse_masked_convs(compact=True)` did before), side by side.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python -m benches.experiments.compact_depthwise --threads 2

One process, one model per method, interleaved rounds (medians): eager masks (the gated graph
as it is), compact without depthwise producers, compact with them. Forward, backward and an SGD
step on MNIST-shaped input (batch 64), random masks at each density (the same masks for the
three). Before timing, the two compact graphs are checked against each other (same loss, gradients
within 1e-2 of the largest in float32, 1e-10 with ``--dtype float64``; the last column says how
close).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

import fxprune
from benches.micro.bench_kernels import _step, random_masks
from fxprune.nets import NETS
from fxprune.passes import fuse_masked_conv
from fxprune.passes.gal_masks import insert_soft_masks
from fxprune.passes.gates import insert_gates


@contextmanager
def _no_depthwise_producers():
    """The pass as it was before depthwise producers: a depthwise conv never produces a region."""
    real = fuse_masked_conv._Fuser.compact_source

    def ungrouped_only(self, mul):
        src = real(self, mul)
        return None if src is not None and src["depthwise"] else src

    fuse_masked_conv._Fuser.compact_source = ungrouped_only
    try:
        yield
    finally:
        fuse_masked_conv._Fuser.compact_source = real


def _compacts(module):
    with _no_depthwise_producers():
        without = fuse_masked_conv.fuse_masked_convs(module, mode="hard", compact=True, cache_live=True)
    return without, fuse_masked_conv.fuse_masked_convs(module, mode="hard", compact=True, cache_live=True)


def _grads(module, x, loss):
    module.zero_grad(set_to_none=True)
    value = loss(module(x))
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _check(a, b, plain, x, loss, tol: float) -> float:
    """The two compact graphs (they share the plain graph's parameters) give the same loss and
    gradients: the largest gradient difference relative to the largest gradient, at most `tol`.
    float64: exact (1e-10). float32: 1e-2; the depthwise conv over fewer channels takes other
    oneDNN kernels and the trained net amplifies rounding: measured once the timing steps had
    trained it, the plain gated graph's own float32 gradients were 7e-4 (relative) from the
    float64 ones, the depthwise-compact graph's the same 7e-4."""
    (la, ga), (lb, gb) = _grads(a, x, loss), _grads(b, x, loss)
    assert torch.allclose(la, lb, rtol=1e-5) and ga.keys() == gb.keys()
    assert all(torch.isfinite(g).all() for g in gb.values())
    scale = max(g.abs().max() for g in ga.values())
    worst = float(max((ga[k] - gb[k]).abs().max() for k in ga) / scale)
    assert worst <= tol, worst
    plain.zero_grad(set_to_none=True)
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2_mini")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--round-time", type=float, default=0.3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                    help="float64: the check is exact (1e-10); float32: 1e-3")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = NETS[args.model]().to(dtype).train()
    x = torch.randn(args.batch, 1, 28, 28, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,))
    analysis = fxprune.analyze(model, x[:2]).channels
    gated = insert_gates(analysis)
    masked = insert_soft_masks(analysis, ("channel",), "ones", 0)
    with torch.no_grad():
        target = model(x).detach()
    for p in masked.params():
        p.requires_grad_(False)  # GAL after its masks froze
    cases = {"gate_decorator": (gated.module, lambda out: F.cross_entropy(out, y)),
             "gal (frozen)": (masked.module, lambda out: F.mse_loss(out, target))}
    built = {name: (plain, loss, *_compacts(plain)) for name, (plain, loss) in cases.items()}
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.dtype}, CPU; ms per training step, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| method | density | eager masks | compact, depthwise dense | compact, depthwise compact | "
          "speed-up of depthwise compact | vs eager | max grad difference (relative) |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for d in (1.0, 0.75, 0.5, 0.25):
        random_masks(analysis, gated, masked, d, rng)
        for name, (plain, loss, without, with_dw) in built.items():
            worst = _check(without, with_dw, plain, x, loss, 1e-10 if dtype == torch.float64 else 1e-2)
            params = [p for p in plain.parameters() if p.requires_grad]
            fns = {"eager": _step(plain, x, loss, params), "without": _step(without, x, loss, params),
                   "with": _step(with_dw, x, loss, params)}
            for fn in fns.values():
                fn()
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    calls, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < args.round_time:
                        fn()
                        calls += 1
                    times[k].append((time.perf_counter() - t0) / calls)
            e, a, b = (statistics.median(times[k]) * 1e3 for k in ("eager", "without", "with"))
            print(f"| {name} | {d:.2f} | {e:.1f} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {e / b:.2f}x | {worst:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
