"""What glibc's heap policy costs an eager CPU forward: one MobileNetV2-sized depthwise conv (batch 8,
144 channels, 56x56, float32) timed in fresh processes with the default allocator settings and with
the heap kept (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`, what
`fxprune.latency.steady_heap` does while fxprune measures).

    python -m benches.micro.bench_heap --threads 2 --processes 6

Each process: 9 rounds of >= 50 ms of calls, the median ms per call. Fresh processes, because the
default policy's cost depends on what the process freed before (glibc moves its mmap threshold).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import statistics, time, torch, torch.nn.functional as F
torch.set_num_threads({threads})
g = torch.Generator().manual_seed(0)
x = torch.randn(8, 144, 56, 56, generator=g)
w = torch.randn(144, 1, 3, 3, generator=g)
b = torch.randn(144, generator=g)
ts = []
for _ in range(9):
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.05:
        F.conv2d(x, w, b, 1, 1, 1, 144)
        n += 1
    ts.append((time.perf_counter() - t0) / n * 1e3)
print(statistics.median(ts))
"""

SETTINGS = {"default": {}, "heap kept": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=6)
    args = ap.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.processes):  # interleaved: one process of each setting per round
        for name, extra in SETTINGS.items():
            out = subprocess.run([sys.executable, "-c", CHILD.format(threads=args.threads)], env={**base, **extra},
                                 capture_output=True, text=True, check=True, timeout=300)
            results[name].append(float(out.stdout.strip()))
    print(f"depthwise conv 8x144x56x56, float32, {args.threads} threads; ms per call, one value per process\n")
    print("| glibc heap | per process | median |\n|---|---|---:|")
    for name, values in results.items():
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
