"""Where a slim model's GPU time goes: is the forward bound by the GPU's work or by launching it?

On the H200 (torch 2.11, bf16, channels_last) the first GPU run of benches/gpu_check.sh found the
l1 slim resnet50 at half the MACs *slower* than the original (0.89x at batch 64, 0.86x at batch 1),
and the latency profile's end-to-end fit points slower at 0.5 and 0.3 of the width than at 1.0. This
script separates the causes in one run, every variant timed round-robin (CUDA events, medians):

* ``e2e ms``: one forward, synchronised, median of rounds of ``--calls`` calls;
* ``gpu ms``: the summed device time of the kernels of one forward (torch.profiler), i.e. what
  the GPU must do; ``e2e / gpu`` well above 1 means the forward waits for the host (launch-bound)
  and no channel pruning can make it faster;
* ``host ms``: the host time to issue one forward without waiting (mean over ``--calls`` calls
  issued back to back, before the synchronise): the launch floor;
* ``graph ms``: one replay of the forward captured in a CUDA graph (fxprune's
  ``compile="cuda-graph"``, `captured_call`): the same kernels with the host's launches taken
  out, i.e. what the forward costs when it ships with CUDA graphs; ``graph speedup`` compares
  those replays;
* variants: the original (torchvision), the same model as fxprune's GraphModule with nothing
  pruned (the module form alone), l1 at flops 0.5 with round_to 8, and uniform 0.5 (every width
  halved); with ``--auto``, also l1 at flops 0.5 with round_to "auto" on a latency model profiled
  on this device at the first batch (under ``compile="cuda-graph"`` on a GPU: the staircase of the
  kernels, not of the host); each with ``torch.backends.cudnn.benchmark`` off and on. ``MACs kept``
  is the variant's MACs over the original's: efficiency = speedup x MACs kept.

Usage: ``python -m benches.experiments.gpu_overhead --device cuda --batch 64,1 --dtype bfloat16
--channels-last`` (about 40 s on an H100/H200). On a CPU it runs the same steps (no gpu column).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fxprune
from fxprune.latency_model.profile import captured_call
from fxprune.models import build_model
from fxprune.passes.inputs import ExampleInputs
from fxprune.passes.plan import PruningPlan
from fxprune.passes.rewrite import apply_plan


def _prepare(model, device, dtype, channels_last):
    model = model.eval().to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _e2e_and_host(fn, x, device, calls):
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    issued = time.perf_counter()
    _sync(device)
    done = time.perf_counter()
    return (done - start) / calls * 1e3, (issued - start) / calls * 1e3


def _gpu_ms(fn, x, device, calls=5) -> float | None:
    if device.type != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        _sync(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / calls / 1e3


def variants(name: str, shape, auto_on: dict | None = None) -> tuple[dict, dict]:
    """The models compared, and each one's MACs over the original's. `auto_on`: where round_to
    "auto"'s latency model is measured (compress's device / batch / dtype / layout / compile)."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(*shape)
    analysis = fxprune.analyze(model, x)
    out = {"original": model, "fx graph, nothing pruned": apply_plan(analysis.channels, PruningPlan())}
    macs = {"original": 1.0, "fx graph, nothing pruned": 1.0}
    cases = [("l1 flops 0.5 round_to 8", "l1", {"round_to": 8}), ("uniform 0.5", "uniform", {})]
    if auto_on is not None:
        cases.append(("l1 flops 0.5 round_to auto", "l1", {"round_to": "auto", **auto_on}))
    for label, method, extra in cases:
        out[label] = fxprune.compress(model, method, x, flops=0.5, verify=False, **extra)
        macs[label] = out[label].fxprune_report.macs_ratio
    return out, macs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="64,1")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--auto", action="store_true", help="also l1 flops 0.5 round_to auto (profiles the model first)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    auto_on = None
    if args.auto:
        auto_on = {"device": args.device, "batch": int(args.batch.split(",")[0]), "dtype": dtype,
                   "channels_last": args.channels_last, "compile": "cuda-graph" if device.type == "cuda" else None}
    models, macs = variants(args.model, (1, 3, args.size, args.size), auto_on)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{args.model}; {args.dtype}; channels_last {args.channels_last}; {args.calls} calls x {args.rounds} rounds")
    print("| batch | cudnn.benchmark | variant | MACs kept | e2e ms | host ms | gpu ms | e2e / gpu | speedup vs original | "
          "graph ms | graph speedup |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    prepared = {k: _prepare(m, device, dtype, args.channels_last) for k, m in models.items()}
    for batch in [int(b) for b in args.batch.split(",")]:
        x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            with torch.inference_mode():
                for m in prepared.values():  # warm-up (and cuDNN's search when benchmark is on)
                    for _ in range(3):
                        m(x)
            replays = ({k: captured_call(m, ExampleInputs((x,), {}), device) for k, m in prepared.items()}
                       if device.type == "cuda" else {})
            with torch.inference_mode():
                e2e = {k: [] for k in prepared}
                host = {k: [] for k in prepared}
                graph = {k: [] for k in replays}
                for _ in range(args.rounds):
                    for k, m in prepared.items():
                        a, b = _e2e_and_host(m, x, device, args.calls)
                        e2e[k].append(a)
                        host[k].append(b)
                        if k in replays:
                            graph[k].append(_e2e_and_host(lambda _x, r=replays[k]: r(), x, device, args.calls)[0])
                gpu = {k: _gpu_ms(m, x, device) for k, m in prepared.items()}
            base = statistics.median(e2e["original"])
            graph_base = statistics.median(graph["original"]) if replays else None
            for k in prepared:
                e, h, g = statistics.median(e2e[k]), statistics.median(host[k]), gpu[k]
                r = statistics.median(graph[k]) if replays else None
                print(f"| {batch} | {'on' if bench else 'off'} | {k} | {macs[k]:.3f} | {e:.3f} | {h:.3f} | "
                      f"{'-' if g is None else f'{g:.3f}'} | {'-' if g is None else f'{e / g:.2f}'} | "
                      f"{base / e:.2f}x | {'-' if r is None else f'{r:.3f}'} | "
                      f"{'-' if r is None else f'{graph_base / r:.2f}x'} |", flush=True)
            del replays
    torch.backends.cudnn.benchmark = False
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
