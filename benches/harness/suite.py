"""One benchmark run: compile speed, fxprune's and Torch-Pruning's slim models, latency, goals.

`run_suite(BenchConfig(...))` returns every number as plain JSON (see `docs/benchmarks.md` for what
each means); `benches.harness.report` turns it into tables and plots. Per model it

1. counts the original (MACs with FlopCounterMode, params, output shapes);
2. times fxprune's compile stage by stage (`compile_speed`) and the method pass of each
   data-free method;
3. builds a slim model for every FLOPs target x round_to with fxprune (``l1``, verified against
   the masked original) and, when installed, with Torch-Pruning at the same MACs (`peer`); MACs of
   both are counted by the same counter, and both outputs must keep the original's shapes;
4. times the original and all slim models round-robin at each batch size, on every device, dtype
   and torch.compile setting asked for, after at least `fxprune.latency.MIN_WARMUP` warm-up calls
   each (`fxprune.latency.LatencyMeasurer`): a latency whose repeats spread too much, or whose
   warm-up and steady medians differ by more than 2x, is measured again and else recorded as
   unstable (``stable`` False, ``reason``), and no speedup is computed from it;
5. for the head-to-head models (resnet50 by default), times fxprune's and Torch-Pruning's slim
   models at the first FLOPs target pair by pair (`fxprune.latency.paired_latency_ratio`), which
   the goal "no worse than Torch-Pruning" is judged on.

Example::

    >>> from benches.harness import BenchConfig, run_suite
    >>> res = run_suite(BenchConfig(models=["fxprune:resnet20"], flops=(0.5,), round_to=(None,),
    ...                             batches=(1,), threads=1, compile_repeats=1, method_repeats=1,
    ...                             latency_repeats=2, compare=False), log=lambda line: None)
    >>> res["models"]["resnet20"]["variants"][0]["macs_fraction"] <= 0.5
    True
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fxprune import compress
from fxprune.passes.inputs import ExampleInputs
from fxprune.latency import LatencyMeasurement, measure_latencies, paired_latency_ratio, steady_heap
from fxprune.models import build_model, example_input
from .compile_speed import time_compile, time_methods
from .config import DTYPES, BenchConfig, short_name
from .goals import coverage, evaluate_goals
from .machine import REPO, load_average, machine_info
from .metrics import count_macs, count_params, output_shapes
from .peer import prune_to_macs, time_prune, torch_pruning_status

ORIGINAL = "original"


def variant_key(tool: str, flops: float, round_to: int | None) -> str:
    """``fxprune 0.5``, ``torch_pruning 0.3 r8``: the name of a slim model in tables and JSON."""
    return f"{tool} {flops:g}" + (f" r{round_to}" if round_to else "")


def _error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def cuda_status(devices) -> dict:
    """Whether the CUDA measurements run here, and why not when they do not."""
    if "cuda" not in devices:
        return {"measured": False, "message": "not requested (--devices cpu)"}
    if not torch.cuda.is_available():
        return {"measured": False, "message": "no CUDA device on this machine: the GPU numbers (fp32 and bf16, "
                                              "CUDA events, torch.compile on and off) are still to be measured; "
                                              "run `python -m benches.harness` on a GPU machine"}
    return {"measured": True, "message": torch.cuda.get_device_name(0)}


def run_suite(config: BenchConfig, *, log: Callable[[str], None] = print,
              on_progress: Callable[[dict], None] | None = None, root: Path = REPO) -> dict:
    """Every number of one run (see module docstring); `on_progress(results)` after each model.
    `root` is the repository whose commit the results record."""
    cfg = config.validate()
    tp, tp_message = torch_pruning_status() if cfg.compare else (None, "comparison not requested (--no-compare)")
    if cfg.compare and tp is None:
        log(tp_message)
    cuda = cuda_status(cfg.devices)
    if "cuda" in cfg.devices and not cuda["measured"]:
        log(f"CUDA skipped: {cuda['message']}")
    devices = [d for d in cfg.devices if d == "cpu" or cuda["measured"]]
    results = {
        "config": cfg.to_json(), "machine": machine_info(root), "threads": cfg.threads,
        "torch_pruning": {"available": tp is not None, "message": tp_message},
        "devices": {"cpu": {"measured": "cpu" in devices, "message": "CPU"}, "cuda": cuda},
        "models": {},
    }
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        for spec in cfg.specs:
            log(f"[{short_name(spec)}] start (load {load_average():.2f})")
            results["models"][short_name(spec)] = run_model(spec, cfg, tp is not None, devices, log)
            if on_progress is not None:
                on_progress(results)
    finally:
        torch.set_num_threads(threads_before)
    results["duration_s"] = round(time.perf_counter() - start, 1)
    results["coverage"] = coverage(results)
    results["goals"] = evaluate_goals(results)
    return results


def run_model(spec: str, cfg: BenchConfig, compare: bool, devices, log) -> dict:
    name = short_name(spec)
    shape = cfg.input_shape(spec)
    entry = {"spec": spec, "input_shape": list(shape)}
    try:
        model = build_model(spec).eval()
        x = ExampleInputs.normalize(example_input(shape))
        entry.update(macs=count_macs(model, x), params=count_params(model), output_shapes=output_shapes(model, x))
    except Exception as exc:  # noqa: BLE001 - the model cannot even run: say so, go on with the next
        entry["error"] = _error(exc)
        log(f"[{name}] cannot build or run: {entry['error']}")
        return entry
    entry["compile"] = _compile_speed(model, x, cfg, name, log)
    slim: dict[str, nn.Module] = {}
    entry["variants"] = []
    for flops in cfg.flops:
        guess = None
        for round_to in cfg.round_to:
            row, module = _fxprune_variant(model, x, flops, round_to, entry)
            entry["variants"].append(row)
            if module is not None:
                slim[row["key"]] = module
            log(f"[{name}] {row['key']}: " + (f"MACs {row['macs_fraction']:.3f}" if row["ok"] else row["error"]))
            if compare:
                row, module = _peer_variant(model, x, flops, round_to, entry, guess)
                entry["variants"].append(row)
                if module is not None:
                    slim[row["key"]] = module
                    guess = row["ratio"]
                log(f"[{name}] {row['key']}: " + (f"MACs {row['macs_fraction']:.3f} (ratio {row['ratio']:.4f}, "
                                                  f"{row['tries']} tries)" if row["ok"] else row["error"]))
    if compare:
        entry["compile"]["torch_pruning"] = _peer_compile_speed(model, x, cfg, entry)
    entry["latency"] = []
    for device in devices:
        for dtype in cfg.dtype_names(device):
            for compiled in cfg.compile_modes(device):
                for batch in cfg.batches:
                    entry["latency"].append(_latency(model, slim, entry, shape, device, dtype, compiled, batch, cfg))
                    last = entry["latency"][-1]
                    log(f"[{name}] latency {device} {dtype} compile={compiled} batch {batch}: "
                        + (last["error"] if "error" in last else _latency_line(last)))
    if compare and "cpu" in devices and name in cfg.head_to_head_models:
        entry["head_to_head"] = _head_to_head(slim, entry, shape, cfg)
        h2h = entry["head_to_head"]
        log(f"[{name}] head to head: " + (h2h["error"] if "error" in h2h else
                                          f"unstable ({h2h['reason']})" if not h2h.get("stable", True) else
                                          f"fxprune / Torch-Pruning time {h2h['ratio_median']:.3f} "
                                          f"(quartiles {h2h['ratio_q1']:.3f}-{h2h['ratio_q3']:.3f})"))
    return entry


def _head_to_head(slim: dict, entry: dict, shape, cfg: BenchConfig) -> dict:
    """fxprune's and Torch-Pruning's slim models at the first FLOPs target, timed pair by pair at the
    largest batch on the CPU (fp32, eager): `paired_latency_ratio` of their times."""
    flops, batch = cfg.flops[0], max(cfg.batches)
    fx_key, tp_key = variant_key("fxprune", flops, None), variant_key("torch_pruning", flops, None)
    out = {"flops": flops, "batch": batch, "device": "cpu", "dtype": "float32", "fxprune": fx_key,
           "torch_pruning": tp_key}
    if fx_key not in slim or tp_key not in slim:
        return {**out, "error": f"no {fx_key if fx_key not in slim else tp_key} model to time"}
    macs = {v["key"]: v["macs"] for v in entry["variants"] if v["ok"]}
    x = ExampleInputs.normalize(example_input((batch, *shape[1:])))
    out["load_before"] = load_average()
    with steady_heap() as out["steady_heap"]:
        out.update(paired_latency_ratio(slim[fx_key], slim[tp_key], x, pairs=cfg.head_to_head_pairs,
                                        warmup=cfg.warmup_calls, max_spread=cfg.latency_max_spread))
    out["load_after"] = load_average()
    out["macs_reduction"] = {"fxprune": entry["macs"] / macs[fx_key], "torch_pruning": entry["macs"] / macs[tp_key]}
    return out


def _compile_speed(model, x, cfg, name, log) -> dict:
    load = load_average()
    try:
        out = time_compile(model, x, cfg.flops[0], repeats=cfg.compile_repeats)
        out["methods_s"] = time_methods(model, x, cfg.flops[0], repeats=cfg.method_repeats)
    except Exception as exc:  # noqa: BLE001 - recorded; the model counts as not converted
        return {"error": _error(exc), "load_before": load, "load_after": load_average()}
    log(f"[{name}] compile {1000 * out['compile_s']:.0f} ms (+ method {1000 * out['stages_s']['method']:.0f} ms)")
    return {**out, "flops": cfg.flops[0], "load_before": load, "load_after": load_average()}


def _fxprune_variant(model, x, flops, round_to, entry) -> tuple[dict, nn.Module | None]:
    row = {"tool": "fxprune", "key": variant_key("fxprune", flops, round_to), "flops": flops, "round_to": round_to}
    try:
        slim = compress(model, "l1", x, flops, round_to=round_to)
        report = slim.fxprune_report
        macs, shapes = count_macs(slim, x), output_shapes(slim, x)
    except Exception as exc:  # noqa: BLE001 - a model fxprune cannot convert is a result
        return {**row, "ok": False, "error": _error(exc)}, None
    row.update(ok=shapes == entry["output_shapes"], macs=macs, macs_report=report.macs_after,
               macs_fraction=macs / entry["macs"], params=count_params(slim), output_shapes_match=shapes ==
               entry["output_shapes"], max_rel_error=report.max_rel_error,
               compile_s=report.timings["total"] - report.timings["verify"])
    if not row["ok"]:
        row["error"] = f"output shapes changed: {entry['output_shapes']} -> {shapes}"
    return row, slim if row["ok"] else None


def _peer_variant(model, x, flops, round_to, entry, guess) -> tuple[dict, nn.Module | None]:
    row = {"tool": "torch_pruning", "key": variant_key("torch_pruning", flops, round_to), "flops": flops,
           "round_to": round_to}
    res = prune_to_macs(model, x, flops, round_to, macs_before=entry["macs"], first_guess=guess)
    row.update(ok=res.ok, tries=len(res.tries), search=res.tries)
    if not res.ok:
        return {**row, "error": res.error}, None
    row.update(macs=res.macs, macs_fraction=res.macs_fraction, ratio=res.ratio, params=count_params(res.model),
               output_shapes_match=True, compile_s=res.seconds["total"], seconds=res.seconds)
    return row, res.model


def _peer_compile_speed(model, x, cfg, entry) -> dict:
    primary = next((v for v in entry["variants"] if v["tool"] == "torch_pruning" and v["flops"] == cfg.flops[0]
                    and v["round_to"] is None and v["ok"]), None)
    if primary is None:
        return {"error": "Torch-Pruning did not convert this model at the first target"}
    load = load_average()
    out = time_prune(model, x, primary["ratio"], None, cfg.compile_repeats)
    return {**out, "ratio": primary["ratio"], "flops": cfg.flops[0], "load_before": load, "load_after": load_average()}


def _prepare(module: nn.Module, device: str, dtype: str, compiled: bool) -> nn.Module:
    if device == "cpu" and dtype == "float32" and not compiled:
        return module
    module = copy.deepcopy(module).to(device=device, dtype=DTYPES[dtype])
    return torch.compile(module) if compiled else module


def _latency(model, slim, entry, shape, device, dtype, compiled, batch, cfg) -> dict:
    """The original and every slim model timed side by side (`LatencyMeasurer`, medians). Each
    latency is recorded with its quality (``original`` / ``latency``: quartiles, spread, warm-up
    median, rounds, ``stable``, ``reason``); a slim model's ``speedup`` and ``efficiency`` are None
    (and ``stable`` False, ``reason`` why) unless both its latency and the original's are stable."""
    measurer = cfg.latency_measurer(cfg.latency_repeats_for(entry["spec"], device))
    out = {"device": device, "dtype": dtype, "torch_compile": compiled, "batch": batch, "repeats": measurer.repeats,
           "warmup": measurer.warmup_calls(0), "threads": cfg.threads, "max_spread": measurer.max_spread,
           "max_warmup_ratio": measurer.max_warmup_ratio}
    x = ExampleInputs.normalize(example_input((batch, *shape[1:])))
    x = x.map_tensors(lambda t: t.to(device=device, dtype=DTYPES[dtype]) if t.is_floating_point() else t.to(device))
    out["load_before"] = load_average()
    try:
        models = {ORIGINAL: _prepare(model, device, dtype, compiled)}
        models.update({k: _prepare(m, device, dtype, compiled) for k, m in slim.items()})
        with steady_heap() as out["steady_heap"]:
            times = measure_latencies(models, x, measurer)
    except Exception as exc:  # noqa: BLE001 - e.g. torch.compile or bf16 unsupported here
        return {**out, "error": _error(exc), "load_after": load_average()}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    out["load_after"] = load_average()
    out.update(latency_entry(times[ORIGINAL], {k: times[k] for k in slim}, entry))
    return out


def latency_entry(original: LatencyMeasurement, slim: dict[str, LatencyMeasurement], entry: dict) -> dict:
    """The JSON of one latency setting from its measurements: the original's median and quality,
    and per slim model its median, quality, speedup (original median / its median, both from the
    same side-by-side round) and speedup per MACs reduction, None where either latency is unstable."""
    out = {"original_ms": original.median_ms, "original_min_ms": original.min_ms, "original": original.to_json(),
           "rounds": original.rounds, "slim": {}}
    macs = {v["key"]: v["macs"] for v in entry["variants"] if v["ok"]}
    for key, m in slim.items():
        reduction = entry["macs"] / macs[key]
        reasons = [f"original {original.reason}"] if not original.stable else []
        reasons += [] if m.stable else [m.reason]
        speedup = original.median_ms / m.median_ms if not reasons else None
        out["slim"][key] = {"ms": m.median_ms, "min_ms": m.min_ms, "latency": m.to_json(), "stable": not reasons,
                            "reason": "; ".join(reasons), "speedup": speedup, "macs_reduction": reduction,
                            "efficiency": None if speedup is None else speedup / reduction}
    out["stable"] = original.stable and all(m.stable for m in slim.values())
    return out


def _latency_line(lat: dict) -> str:
    """The console line of one latency setting: the original's latency, or why it is no result."""
    o = lat.get("original") or {}
    text = (f"original {lat['original_ms']:.1f} ms" if o.get("stable", True) else f"original unstable ({o['reason']})")
    flagged = [k for k, s in lat.get("slim", {}).items() if not s.get("stable", True)]
    rounds = o.get("rounds", 1)
    return text + (f", {len(flagged)} slim model(s) without a speedup (unstable)" if flagged else "") + (
        f" after {rounds} rounds" if rounds > 1 else "")


def merge_results(old: dict, new: dict) -> dict:
    """`new` with the models of `old` it did not measure kept (re-measure a few models of a run).

    Models keep `old`'s order, new ones go last; ``runs`` lists every run the numbers come from
    (command, date, duration, load at the start, and the models whose numbers are still its own);
    coverage and goals are judged again.
    """
    def run_of(r: dict) -> list:
        return r.get("runs") or [{"command": r.get("command"), "date": r.get("machine", {}).get("date"),
                                  "duration_s": r.get("duration_s"), "load_average": r.get("machine", {}).get(
                                      "load_average"), "models": list(r.get("models", {}))}]

    merged = dict(new)
    merged["models"] = {**old.get("models", {}), **new.get("models", {})}
    measured = set(new.get("models", {}))
    earlier = [{**r, "models": [m for m in r.get("models", []) if m not in measured]} for r in run_of(old)]
    merged["runs"] = [r for r in earlier if r["models"]] + run_of(new)  # only runs some numbers still come from
    if new.get("kernels", {}).get("status") != "ok" and old.get("kernels", {}).get("status") == "ok":
        merged["kernels"] = old["kernels"]
    merged["coverage"] = coverage(merged)
    merged["goals"] = evaluate_goals(merged)
    return merged

