"""The masked conv's CPU scatter (placing the live channels' conv result among exact zeros), timed
the way the op runs it: right after the conv that produced it, as a ratio to that conv alone.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python -m benches.micro.bench_scatter --threads 2

Three ways to write the dense output:

* ``zero + index_copy_`` (`fxprune.kernels.gather._scatter_channels` since 2026-12-08): one zero fill
  of the whole output, then one ``index_copy_`` of the live channels;
* ``split + foreach`` (2026-12-07 to 2026-12-08): one ``split`` of the channel axis into runs of live
  and dead channels, ``_foreach_copy_`` / ``_foreach_zero_`` over them (every byte written once);
* ``per-run loop`` (before): a Python slice and a ``copy_`` / ``zero_`` per run.

The layers are the sweep's (`bench_kernels.GOAL_LAYERS`, the depthwise one left out: it gathers
whole groups), batch 8, float32, NCHW, random live channels (seeded); medians of 15 interleaved
rounds of at least 10 ms each. Every way is checked equal to ``index_copy_`` into zeros first.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benches.micro.bench_kernels import GOAL_LAYERS, setup
from fxprune.kernels import gather


def live_runs(idx: list[int]) -> list[tuple[int, int]]:
    """(first, length) of each run of consecutive channel numbers (idx sorted)."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(a, b) for a, b in runs]


def per_run_loop(z, runs, cout):
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


def split_foreach(z, runs, cout):
    n, _, h, w = z.shape
    y = torch.empty((n, cout, h, w), dtype=z.dtype)
    sizes, live_parts, dead_parts, start = [], [], [], 0
    for first, length in runs:
        if first > start:
            dead_parts.append(len(sizes))
            sizes.append(first - start)
        live_parts.append(len(sizes))
        sizes.append(length)
        start = first + length
    if start < cout:
        dead_parts.append(len(sizes))
        sizes.append(cout - start)
    parts = y.split(sizes, 1)
    torch._foreach_copy_([parts[i] for i in live_parts], list(z.split([length for _, length in runs], 1)))
    if dead_parts:
        torch._foreach_zero_([parts[i] for i in dead_parts])
    return y


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, batch 8, float32; each cell: (conv + scatter) / conv\n")
    print("| layer | density | runs | conv ms | zero + index_copy_ | split + foreach | per-run loop |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for layer in GOAL_LAYERS:
        if layer == "mv2.dw":
            continue
        for d in (0.75, 0.5, 0.25):
            s = setup(layer, d, torch.float32, "cpu", 8)
            x, live, cout = s["x"], s["live"], s["w"].shape[0]
            w, b = s["w"][live].contiguous(), s["b"][live].contiguous()
            runs = live_runs(live.tolist())

            def conv():
                return F.conv2d(x, w, b, s["stride"], s["pad"])

            fns = {"conv": conv,
                   "zero": lambda: gather._scatter_channels(conv(), live, cout),
                   "split": lambda: split_foreach(conv(), runs, cout),
                   "loop": lambda: per_run_loop(conv(), runs, cout)}
            ref = torch.zeros(x.shape[0], cout, *conv().shape[2:]).index_copy_(1, live, conv())
            assert all(torch.equal(fns[k](), ref) for k in ("zero", "split", "loop"))
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, f in fns.items():
                    calls, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < 0.01:
                        f()
                        calls += 1
                    times[k].append((time.perf_counter() - t0) / calls)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {layer} | {d:.2f} | {len(runs)} | {med['conv'] * 1e3:.2f} | "
                  + " | ".join(f"{med[k] / med['conv']:.3f}" for k in ("zero", "split", "loop")) + " |", flush=True)


if __name__ == "__main__":
    main()
