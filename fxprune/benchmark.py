"""``fxprune bench``: your models before and after compression, timed side by side.

    fxprune bench torchvision:resnet50 --method l1 --flops 0.5 --batch 1,32 --threads 2 --json out.json

Each model is built (random weights), compressed (`fxprune.compress`), and at every batch size the
original and the slim model are timed with `fxprune.latency.LatencyMeasurer`: round-robin, after
warm-up calls, median of the repeats. A latency whose repeats spread too much, or whose warm-up
calls differ too much from the steady ones, is measured again and otherwise marked unstable; no
speedup is computed from an unstable latency. The table shows device, threads, batch, dtype,
params, MACs and FLOPs per image (FLOPs = 2 x MACs, separate columns), latency and speedup.

Example::

    >>> from fxprune.benchmark import bench_models, render_table
    >>> res = bench_models(["fxprune:lenet5"], batches=(1,), repeats=3)
    >>> m = res["models"][0]
    >>> m["flops"]["slim"] == 2 * m["macs"]["slim"] and m["macs"]["slim"] <= 0.5 * m["macs"]["original"]
    True
"""
from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import torch
from tabulate import tabulate

from .api import compress
from .constraints import Constraints
from .errors import ConfigError, FxpruneError
from .latency import MIN_WARMUP, LatencyMeasurer, measure_latencies, steady_heap
from .methods import get_method
from .models import build_model, default_input_shape, example_input
from .passes.inputs import ExampleInputs
from .report import human

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_options(method: str, flops: float, round_to: int | str | None, batches: Sequence[int],
                  threads: int | None, device: str, dtype: str, repeats: int, warmup: int,
                  latency: float | None = None, blocks: bool = False) -> None:
    """A ConfigError for anything that cannot run, before any model is built."""
    get_method(method)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats={repeats!r} must be a positive integer")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup={warmup!r} must be an integer >= 0")
    Constraints(flops=flops, round_to=round_to, latency=latency, blocks=blocks)
    if blocks:
        Constraints(flops=flops, latency=latency, blocks=blocks).require_supported(method, get_method(method).supports)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ConfigError(f"batch sizes {list(batches)} must be positive integers, e.g. --batch 1,32")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be a positive integer")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device on this machine")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")


def bench_model(spec: str, *, method: str = "l1", flops: float = 0.5, round_to: int | str | None = None,
                batches: Sequence[int] = (1,), input_shape: Sequence[int] | None = None, device: str = "cpu",
                dtype: str = "float32", measurer: LatencyMeasurer | None = None, verify: bool = True,
                measure: Callable | None = None, latency: float | None = None, channels_last: bool = False,
                blocks: bool = False) -> dict:
    """One model's numbers: params, MACs and FLOPs per image of the original and the slim model,
    and per batch size both latencies (with their quality) and the speedup (None where either is
    unstable). `measure(models, inputs, measurer)` times the models (default `measure_latencies`).
    A latency target (`latency=`, a fraction) and `round_to="auto"` are measured on `device` at the
    first batch size, in `dtype` and memory format, as the timing below is."""
    measurer = measurer or LatencyMeasurer()
    measure = measure or measure_latencies
    shape = tuple(input_shape) if input_shape else default_input_shape(spec)
    entry = {"spec": spec, "input_shape": [1, *shape[1:]]}
    model = build_model(spec).eval()
    start = time.perf_counter()
    slim = compress(model, method, example_input((1, *shape[1:])), flops, round_to=round_to, verify=verify,
                    latency=latency, device=device, batch=batches[0], dtype=DTYPES[dtype], channels_last=channels_last,
                    blocks=blocks)
    report = slim.fxprune_report
    entry.update(compress_s=time.perf_counter() - start, max_rel_error=report.max_rel_error,
                 params={"original": report.params_before, "slim": report.params_after},
                 macs={"original": report.macs_before, "slim": report.macs_after},
                 flops={"original": 2 * report.macs_before, "slim": 2 * report.macs_after})
    entry["macs_reduction"] = report.macs_before / max(report.macs_after, 1)
    if "latency" in report.details:  # what the method predicted and measured for its target
        entry["latency_target"] = {k: v for k, v in report.details["latency"].items() if k != "rounds"}
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, dtype=DTYPES[dtype], memory_format=layout)  # both models are this function's own
    slim.to(device=device, dtype=DTYPES[dtype], memory_format=layout)
    entry["latency"] = []
    for batch in batches:
        x = example_input((batch, *shape[1:])).to(device=device, dtype=DTYPES[dtype])
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with steady_heap() as steady:
            ms = measure({"original": model, "slim": slim}, ExampleInputs.normalize(x), measurer)
        original, small = ms["original"], ms["slim"]
        reasons = ([f"original {original.reason}"] if not original.stable else []) + (
            [f"slim {small.reason}"] if not small.stable else [])
        entry["latency"].append({
            "batch": batch, "original": original.to_json(), "slim": small.to_json(), "steady_heap": steady,
            "stable": not reasons, "reason": "; ".join(reasons),
            "speedup": None if reasons else original.median_ms / small.median_ms})
    return entry


def bench_models(specs: Sequence[str], *, method: str = "l1", flops: float = 0.5, round_to: int | str | None = None,
                 batches: Sequence[int] = (1,), threads: int | None = None, device: str = "cpu",
                 dtype: str = "float32", repeats: int = 7, warmup: int = MIN_WARMUP,
                 input_shape: Sequence[int] | None = None, verify: bool = True, measure: Callable | None = None,
                 log: Callable[[str], None] = lambda _: None, latency: float | None = None,
                 channels_last: bool = False, blocks: bool = False) -> dict:
    """`bench_model` for every spec under one setting (threads set for the run, restored after);
    a model that cannot be built or compressed is recorded with its ``error``."""
    check_options(method, flops, round_to, batches, threads, device, dtype, repeats, warmup, latency, blocks)
    measurer = LatencyMeasurer(repeats=repeats, warmup=warmup)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "threads":
               torch.get_num_threads(), "dtype": dtype, "method": method, "flops_target": flops, "round_to": round_to,
               "latency_target": latency, "blocks": blocks, "channels_last": channels_last,
               "batches": list(batches), "repeats": measurer.repeats, "warmup": measurer.warmup_calls(0),
               "max_spread": measurer.max_spread, "max_warmup_ratio": measurer.max_warmup_ratio,
               "extra_rounds": measurer.extra_rounds,
               "versions": {"torch": torch.__version__, "fxprune": _version("fxprune")}, "models": []}
    try:
        for spec in specs:
            log(f"[{spec}] compress and time")
            try:
                results["models"].append(bench_model(
                    spec, method=method, flops=flops, round_to=round_to, batches=batches, input_shape=input_shape,
                    device=device, dtype=dtype, measurer=measurer, verify=verify, measure=measure, latency=latency,
                    channels_last=channels_last, blocks=blocks))
            except FxpruneError as exc:
                results["models"].append({"spec": spec, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        torch.set_num_threads(before)
    return results


def _latency(m: dict) -> str:
    return f"{m['median_ms']:.2f} ms" if m["stable"] else f"unstable ({m['reason']})"


def render_table(results: dict) -> str:
    """One row per model, batch and variant; an unstable latency shows why, and no speedup."""
    rows = []
    common = [results["device"], results["threads"]]
    for e in results["models"]:
        if "error" in e:
            rows.append([e["spec"], "", *common, "", results["dtype"], "", "", "", e["error"], ""])
            continue
        for lat in e["latency"]:
            for variant in ("original", "slim"):
                speedup = ("" if variant == "original" else f"{lat['speedup']:.2f}x" if lat["stable"]
                           else "none (unstable)")
                rows.append([e["spec"] if variant == "original" else "", variant, *common, lat["batch"],
                             results["dtype"], human(e["params"][variant]), human(e["macs"][variant]),
                             human(e["flops"][variant]), _latency(lat[variant]), speedup])
    table = tabulate(rows, headers=["model", "variant", "device", "threads", "batch", "dtype", "params",
                                    "MACs/image", "FLOPs/image", "latency (median)", "speedup"],
                     tablefmt="github", disable_numparse=True)
    target = (f", latency target {results['latency_target']:g} of the original" if results.get("latency_target")
              else "") + (" (whole residual blocks may go)" if results.get("blocks") else "")
    note = (f"{results['method']} at flops={results['flops_target']:g}{target}, round_to={results.get('round_to')}; "
            f"latency: median of {results['repeats']} "
            f"repeats after {results['warmup']} warm-up calls each, original and slim timed round-robin; a latency "
            f"spreading more than {results['max_spread']:.0%} (IQR / median) or whose warm-up is more than "
            f"{results['max_warmup_ratio']:g}x off is measured again ({results['extra_rounds']} more rounds at most), "
            "then marked unstable and given no speedup. FLOPs = 2 x MACs.")
    return f"{table}\n\n{note}"


def write_json(path, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
