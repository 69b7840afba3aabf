"""The masked conv's CPU scatter over runs of live channels: one ``split`` + ``_foreach_copy_`` /
``_foreach_zero_`` (`fxprune.kernels.gather._scatter_channels`, since 2026-12-07) against the
per-run Python loop it replaced (a slice and a copy or zero per run, kept here as the baseline).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benches/micro/bench_scatter.py --threads 2

Random live channels (seeded), float32, NCHW; medians of interleaved calls. Both results are
checked equal to ``index_copy_`` into zeros before timing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fxprune.kernels import gather
from fxprune.kernels.live import live

SHAPES = ((8, 144, 56), (8, 64, 56), (8, 256, 56), (64, 64, 28))  # (batch, channels, plane side)


def per_run_loop(z, runs, cout):
    """The scatter as it was before: one Python slice + copy_ / zero_ per run."""
    n, _, h, w = z.shape
    y = torch.empty((n, cout, h, w), dtype=z.dtype)
    pos, start = 0, 0
    for first, length in runs:
        if first > start:
            y[:, start:first].zero_()
        y[:, first:first + length].copy_(z[:, pos:pos + length])
        pos, start = pos + length, first + length
    if start < cout:
        y[:, start:].zero_()
    return y


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=41)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, torch {torch.__version__}\n")
    print("| batch | channels | plane | density | runs | per-run loop ms | split + foreach ms | ratio |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, c, h in SHAPES:
        for d in (0.75, 0.5, 0.25):
            idx = torch.randperm(c, generator=gen)[:int(c * d)].sort().values
            mask = torch.zeros(c)
            mask[idx] = 1
            lv = live(mask)
            z = torch.randn(n, len(idx), h, h, generator=gen)
            ref = torch.zeros(n, c, h, h).index_copy_(1, idx, z)
            fns = {"loop": lambda: per_run_loop(z, lv.runs, c),
                   "split": lambda: gather._scatter_channels(z, idx, c, torch.contiguous_format, lv)}
            assert all(torch.equal(f(), ref) for f in fns.values())
            times = {k: [] for k in fns}
            for _ in range(args.calls):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            a, b = (statistics.median(times[k]) * 1e3 for k in ("loop", "split"))
            print(f"| {n} | {c} | {h}x{h} | {d:.2f} | {len(lv.runs)} | {a:.3f} | {b:.3f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
