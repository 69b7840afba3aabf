"""The CPU goals of the latency-aware pruning issue ("Speed a user can measure"), measured.

Run from the repository root (a script, not a test; it takes a long time on a 2-core CPU)::

    python -m benches.experiments.latency_goals                       # the six models, batch 32, 2 threads
    python -m benches.experiments.latency_goals --models resnet50,mobilenet_v2 --stop-after-min 55
    python -m benches.experiments.latency_goals --table               # print the table of the JSON only

For each model (torchvision, ``weights=None``, seeded, eval mode, fp32, 1x3x224x224 example input,
latency measured at ``--batch`` rows with ``torch.set_num_threads(--threads)`` on the CPU):

(a) profiling cost: `fxprune.latency_model.profile_latency` into an empty cache folder (first
    time), then again from that cache (seconds). Goal for resnet50: <= 60 s / <= 2 s.
(b) ``compress(model, "l1", x, flops=1.0, latency=0.5, batch=B)``: the latency the method
    measured itself (``details["latency"]``: measured before = the original during profiling,
    measured after = the slim model measured alone), and the original and slim model measured
    again side by side afterwards (`fxprune.latency.measure_latencies`: round-robin, medians,
    re-measured while unstable; plus `paired_latency_ratio`, back-to-back pairs in alternating
    order). Goal: slim <= 0.5 x original x 1.05, judged on the side-by-side medians. MACs kept
    (capacity) are reported too.
(c) ``compress(model, "l1", x, flops=0.5, round_to=R)`` for R in None, 8, "auto"; the original
    and the three slim models timed side by side. Efficiency as in docs/benchmarks.md: measured
    speedup (original / slim latency) divided by the MACs reduction (original / slim MACs). Goal
    for "auto": >= 0.95.

Every latency is a side-by-side ratio from one measurement round. On a shared machine two torch
threads on 2 cores next to one busy process run many times slower, and evenly so, which the
measurer's spread check does not see; so before each profile and measurement the script waits
(``--wait-quiet`` seconds at most) until other processes use less than ``--quiet-limit`` cores
(sampled from /proc/stat), and measures again (``--attempts`` in all) a profile, a latency-target
compress or a side-by-side round during which they used more than ``--busy-limit`` cores, one whose
latencies are flagged unstable (`LatencyMeasurement.stable`), or one whose original is more than
``--max-drift`` times off its profiled latency; a ratio that stays so is reported as not judged.
Compress uses the cache the profile wrote ($FXPRUNE_CACHE is set to the model's cache folder), so
(b) and (c) do not profile again. ``--label N`` stores a repeat run as NAME@N next to the first.

Results go to ``--json`` (default docs/latency_goals.json) after each model; models already
there are skipped unless ``--force`` (resumable). A typed fxprune error is recorded and the run
goes on. ``--stop-after-min`` stops starting new models after that many minutes; those are
recorded as not run. The Markdown table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torchvision
from fxprune.passes.inputs import ExampleInputs

import fxprune
from fxprune.errors import FxpruneError, LatencyUnreachableError
from fxprune.latency import (
    LatencyMeasurer,
    measure_latencies,
    paired_latency_ratio,
    steady_heap,
)
from fxprune.latency_model import profile_latency

from benches.harness.machine import cpu_model

REPO = Path(__file__).resolve().parents[2]
MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "densenet121", "regnet_y_800mf")
LATENCY_TARGET, LATENCY_SLACK = 0.5, 1.05
FLOPS = 0.5
ROUND_TOS = (None, 8, "auto")
GOAL_PROFILE_COLD_S, GOAL_PROFILE_CACHED_S, GOAL_AUTO_EFFICIENCY = 60.0, 2.0, 0.95
PROFILE_GOAL_MODEL = "resnet50"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_sample() -> tuple[float, float, float] | None:
    """(busy jiffies of the whole machine, jiffies of this process, monotonic seconds), or None."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = f[0] + f[1] + f[2] + sum(f[5:8])  # user nice system irq softirq steal
    return float(busy), float(int(mine[11]) + int(mine[12])), time.monotonic()


def others_cores(before, after) -> float | None:
    """Cores that other processes kept busy between two `_cpu_sample`s (None where unknown)."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / _HZ / (after[2] - before[2]))


def wait_quiet(max_s: float, limit: float, sample_s: float = 3.0) -> dict:
    """Wait (at most `max_s`) until other processes use less than `limit` cores over `sample_s`."""
    start = time.perf_counter()
    seen = None
    while True:
        a = _cpu_sample()
        time.sleep(sample_s)
        seen = others_cores(a, _cpu_sample())
        waited = time.perf_counter() - start
        if seen is None or seen < limit or waited >= max_s:
            out = {"waited_s": round(waited, 1), "others_cores": None if seen is None else round(seen, 2),
                   "quiet": seen is None or seen < limit}
            if waited > sample_s + 1:
                log(f"  waited {waited:.0f} s for a quiet machine (other processes {seen:.2f} cores"
                    f"{'' if out['quiet'] else ', not reached'})")
            return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def error_json(exc: BaseException) -> dict:
    out = {"type": type(exc).__name__, "message": str(exc)[:2000]}
    if not isinstance(exc, FxpruneError):
        out["traceback"] = traceback.format_exc()[-3000:]
    return out


def build(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return model, torch.randn(1, 3, size, size)


# ------------------------------------------------------------------------------ measuring


def side_by_side(models: dict, xb: ExampleInputs, args, reference_ms: float | None = None) -> dict:
    """All `models` timed round-robin (`measure_latencies`, steady heap), after waiting for a quiet
    machine. The whole group is measured again (at most `args.attempts` times) while a latency is
    unstable, while other processes kept more than `args.busy_limit` cores busy during it, or while
    the original's median is more than `args.max_drift` x `reference_ms` (the profile's measurement
    of it) away: 2 threads sharing 2 cores with another busy process run many times slower, and
    evenly so, which the spread check alone does not see. Ratios come from one round."""
    measurer = LatencyMeasurer(repeats=args.repeats)
    tries = []
    for i in range(args.attempts):
        quiet = wait_quiet(args.wait_quiet, args.quiet_limit)
        load = load_average()
        t0, c0 = time.perf_counter(), _cpu_sample()
        with steady_heap() as applied:
            ms = measure_latencies(models, xb, measurer)
        others = others_cores(c0, _cpu_sample())
        stable = all(m.stable for m in ms.values())
        orig = ms["original"].median_ms
        drift = None if not reference_ms else orig / reference_ms
        reasons = [] if stable else ["unstable: " + "; ".join(f"{k} {m.reason}" for k, m in ms.items() if not m.stable)]
        if others is not None and others > args.busy_limit:
            reasons.append(f"other processes used {others:.2f} cores")
        if drift is not None and not 1 / args.max_drift <= drift <= args.max_drift:
            reasons.append(f"original {drift:.2f}x its profiled latency")
        tries.append({"attempt": i + 1, "seconds": time.perf_counter() - t0, "load_before": load,
                      "load_after": load_average(), "others_cores": others, "wait": quiet,
                      "steady_heap": applied, "stable": stable, "drift": drift, "valid": not reasons,
                      "reasons": reasons, "latency": {k: m.to_json() for k, m in ms.items()}})
        log("  side by side: " + ", ".join(f"{k} {m.describe()}" for k, m in ms.items())
            + f" (attempt {i + 1}, load {load}, others {_f(others, '.2f')} cores"
            + (f"; rejected: {', '.join(reasons)}" if reasons else "") + ")")
        if not reasons:
            break
    good = [t for t in tries if t["valid"]]
    last = good[-1] if good else tries[-1]
    return {"repeats": args.repeats, "warmup": measurer.warmup_calls(0), "stable": last["valid"],
            "ms": {k: v["median_ms"] for k, v in last["latency"].items()}, "attempts": tries}


def paired(a, b, xb: ExampleInputs, args) -> dict:
    """Time of `a` over time of `b`, pair by pair (alternating order), re-run while unstable or
    while other processes were busy."""
    tries = []
    for i in range(args.attempts):
        quiet = wait_quiet(args.wait_quiet, args.quiet_limit)
        load, c0 = load_average(), _cpu_sample()
        with steady_heap():
            r = paired_latency_ratio(a, b, xb, pairs=args.pairs)
        others = others_cores(c0, _cpu_sample())
        r.update({"load_before": load, "load_after": load_average(), "attempt": i + 1, "others_cores": others,
                  "wait": quiet})
        r["valid"] = r["stable"] and not (others is not None and others > args.busy_limit)
        tries.append(r)
        log(f"  pair by pair: ratio {r['ratio_median']:.3f} ({r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}), "
            f"{'stable' if r['stable'] else 'unstable ' + r['reason']}, others {_f(others, '.2f')} cores")
        if r["valid"]:
            break
    good = [t for t in tries if t["valid"]]
    return {**(good[-1] if good else tries[-1]), "attempts": len(tries)}


def layer_breakdown(lat_model, recipe: dict | None, top: int = 10) -> dict | None:
    """Predicted per-layer seconds (latency model, before the fit's scale/offset) of the original and
    of the slim model the recipe describes: the slowest layers, and totals by op."""
    if not recipe:
        return None
    kept = {int(g): len(v) for g, v in recipe["plan"]["keep"].items() if int(g) in lat_model.n_units}
    full, slim = lat_model.layer_times({}), lat_model.layer_times(kept)
    layers = lat_model.layers()
    order = sorted(range(len(layers)), key=lambda i: -full[i])
    by_op: dict[str, list[float]] = {}
    for i, layer in enumerate(layers):
        acc = by_op.setdefault(layer["op"], [0.0, 0.0, 0])
        acc[0] += float(full[i])
        acc[1] += float(slim[i])
        acc[2] += 1
    return {"scale": lat_model.scale, "offset_ms": 1e3 * lat_model.offset,
            "layers_full_ms": 1e3 * float(full.sum()), "layers_slim_ms": 1e3 * float(slim.sum()),
            "predicted_full_ms": 1e3 * lat_model.predict({}), "predicted_slim_ms": 1e3 * lat_model.predict(kept),
            "top": [{"node": layers[i]["node"], "op": layers[i]["op"], "full_ms": 1e3 * float(full[i]),
                     "slim_ms": 1e3 * float(slim[i])} for i in order[:top]],
            "by_op": {op: {"full_ms": 1e3 * v[0], "slim_ms": 1e3 * v[1], "layers": v[2]}
                      for op, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])}}


def variant_json(slim, seconds: float) -> dict:
    rep = slim.fxprune_report
    return {"ok": True, "compress_s": seconds, "macs": rep.macs_after, "macs_ratio": rep.macs_ratio,
            "params": rep.params_after, "params_ratio": rep.params_after / max(rep.params_before, 1),
            "max_rel_error": rep.max_rel_error, "method_s": rep.timings.get("method"),
            "latency_details": rep.details.get("latency") if isinstance(rep.details, dict) else None}


def cache_files(cache: Path) -> int:
    return len(list((cache / "latency").glob("*.json"))) if (cache / "latency").is_dir() else 0


# ------------------------------------------------------------------------------ one model


class _Skipped(Exception):
    """(b) not run this pass (--skip-latency-target)."""


def run_model(name: str, args, cache_root: Path) -> dict:
    entry: dict = {"model": name, "batch": args.batch, "threads": args.threads, "dtype": "float32",
                   "input": [1, 3, args.size, args.size], "date": time.strftime("%Y-%m-%d %H:%M"),
                   "load_start": load_average()}
    t_model = time.perf_counter()
    model, x = build(name, args.size)
    xb = ExampleInputs.normalize(torch.randn(args.batch, 3, args.size, args.size))
    entry["profile"] = {}

    # (a) profiling cost: each attempt into a new, empty cache folder; measured again when other
    # processes were busy during it (its timings, and the original's latency it records, would be off)
    try:
        analysis = fxprune.analyze(model, x)
        entry["macs"], entry["params"] = int(analysis.cost.total_macs), int(analysis.cost.total_params)
        entry["prunable_groups"] = len(analysis.channels.prunable_groups)
        attempts = []
        for attempt in range(args.attempts):
            cache = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cache_root))
            os.environ["FXPRUNE_CACHE"] = str(cache)  # compress finds the profile made here
            assert cache_files(cache) == 0, "the cache folder is not empty"
            quiet = wait_quiet(args.wait_quiet, args.quiet_limit)
            load, c0 = load_average(), _cpu_sample()
            t0 = time.perf_counter()
            lat_model = profile_latency(analysis, batch=args.batch, threads=args.threads)
            cold = time.perf_counter() - t0
            profile_others = others_cores(c0, _cpu_sample())
            t0 = time.perf_counter()
            again = profile_latency(analysis, batch=args.batch, threads=args.threads)
            cached = time.perf_counter() - t0
            prof = lat_model.profile
            valid = profile_others is None or profile_others <= args.busy_limit
            attempts.append({"cold_s": cold, "cached_s": cached, "others_cores": profile_others, "valid": valid,
                             "original_ms": 1e3 * lat_model.original_s})
            entry["profile"] = {"cold_s": cold, "cached_s": cached, "cached_source": again.source,
                                "load_before": load, "load_after": load_average(), "others_cores": profile_others,
                                "wait": quiet, "valid": valid, "attempts": attempts, "cache_dir": str(cache),
                                "timed_points": prof.get("calls"), "layers": prof.get("layers"),
                                "tables": prof.get("tables"), "layers_s": prof.get("layers_seconds"),
                                "skipped": len(prof.get("skipped", [])), "original_ms": 1e3 * lat_model.original_s,
                                "predicted_ms": 1e3 * lat_model.predict({}), "offset_ms": 1e3 * lat_model.offset,
                                "scale": lat_model.scale, "fit": lat_model.fit}
            log(f"  profile: first {cold:.1f} s ({prof.get('calls')} timed points, {prof.get('layers')} layers, "
                f"{prof.get('tables')} tables), from the cache {cached:.2f} s ({again.source}); original "
                f"{1e3 * lat_model.original_s:.1f} ms; others {_f(profile_others, '.2f')} cores"
                + ("" if valid else "; disturbed, profiling again"))
            if valid:
                break
    except FxpruneError as exc:
        entry["profile"]["error"] = error_json(exc)
        log(f"  profile failed: {exc}")
        entry["seconds"] = time.perf_counter() - t_model
        return entry

    slims: dict[str, torch.nn.Module] = {}

    # (b) latency target
    lt: dict = {"target": LATENCY_TARGET, "flops": 1.0}
    files = cache_files(cache)
    try:
        if args.skip_latency_target:
            raise _Skipped()
        # the method measures slim models itself: done again when other processes were busy meanwhile
        lt["attempts"] = []
        for attempt in range(args.attempts):
            lt["wait"] = wait_quiet(args.wait_quiet, args.quiet_limit)
            c0 = _cpu_sample()
            t0 = time.perf_counter()
            slim = fxprune.compress(model, "l1", x, flops=1.0, latency=LATENCY_TARGET, batch=args.batch)
            lt.update(variant_json(slim, time.perf_counter() - t0))
            lt["others_cores"] = others_cores(c0, _cpu_sample())
            lt["attempts"].append({"others_cores": lt["others_cores"], "macs_ratio": lt["macs_ratio"]})
            if lt["others_cores"] is None or lt["others_cores"] <= args.busy_limit:
                break
            log(f"  latency {LATENCY_TARGET}: other processes used {lt['others_cores']:.2f} cores meanwhile; again")
        lt["breakdown"] = layer_breakdown(lat_model, getattr(slim, "fxprune_recipe", None))
        slims["latency"] = slim
    except LatencyUnreachableError as exc:
        lt.update({"ok": False, "compress_s": time.perf_counter() - t0, "error": error_json(exc),
                   "best_measured_ms": None if exc.best_measured_s is None else 1e3 * exc.best_measured_s,
                   "target_ms": 1e3 * exc.target_s, "best_ms": 1e3 * exc.best_s, "best_measured": exc.measured,
                   "rounds": exc.rounds})
        log(f"  latency {LATENCY_TARGET}: {type(exc).__name__}: {exc}")
        if exc.best_plan is not None:  # still measure the best plan found, to say by how much it missed
            try:
                best, _ = fxprune.prune_with_plan(analysis, exc.best_plan, verify_output=False)
                lt["macs"] = int(fxprune.analyze(best, x).cost.total_macs)
                lt["macs_ratio"] = lt["macs"] / entry["macs"]
                slims["latency (best, missed)"] = best
            except Exception as inner:  # noqa: BLE001
                lt["best_plan_error"] = error_json(inner)
    except FxpruneError as exc:
        lt.update({"ok": False, "compress_s": time.perf_counter() - t0, "error": error_json(exc)})
        log(f"  latency {LATENCY_TARGET}: {type(exc).__name__}: {exc}")
    except _Skipped:
        lt["skipped"] = "--skip-latency-target"
    lt["profiled_again"] = cache_files(cache) != files
    entry["latency_target"] = lt
    if lt.get("ok"):
        d = lt["latency_details"] or {}
        log(f"  latency {LATENCY_TARGET}: compress {lt['compress_s']:.1f} s, MACs kept {lt['macs_ratio']:.3f}, "
            f"method measured {1e3 * d.get('measured_after_s', math.nan):.1f} / "
            f"{1e3 * d.get('measured_before_s', math.nan):.1f} ms, {len(d.get('rounds', []))} rounds")

    # (c) FLOPs 0.5 with round_to None / 8 / auto
    fl: dict = {"flops": FLOPS, "variants": {}}
    for rt in ROUND_TOS:
        key = f"round_to={rt}"
        files = cache_files(cache)
        t0 = time.perf_counter()
        try:
            kw = {"batch": args.batch} if rt == "auto" else {}
            slim = fxprune.compress(model, "l1", x, flops=FLOPS, round_to=rt, **kw)
            fl["variants"][key] = variant_json(slim, time.perf_counter() - t0)
            if rt == "auto":
                fl["variants"][key]["breakdown"] = layer_breakdown(lat_model, getattr(slim, "fxprune_recipe", None))
                fl["variants"][key]["profiled_again"] = cache_files(cache) != files
            slims[key] = slim
            log(f"  flops {FLOPS} {key}: MACs kept {fl['variants'][key]['macs_ratio']:.4f}, "
                f"compress {fl['variants'][key]['compress_s']:.1f} s")
        except FxpruneError as exc:
            fl["variants"][key] = {"ok": False, "compress_s": time.perf_counter() - t0, "error": error_json(exc)}
            log(f"  flops {FLOPS} {key}: {type(exc).__name__}: {exc}")
    entry["flops_half"] = fl

    # Side-by-side measurements
    macs_of = {"latency": lt.get("macs")}
    macs_of.update({k: v.get("macs") for k, v in fl["variants"].items()})
    if "latency" in slims or "latency (best, missed)" in slims:
        k = "latency" if "latency" in slims else "latency (best, missed)"
        sbs = side_by_side({"original": model, k: slims[k]}, xb, args, 1e3 * lat_model.original_s)
        sbs["ratio"] = sbs["ms"][k] / sbs["ms"]["original"]
        lt["side_by_side"] = sbs
        lt["paired"] = paired(slims[k], model, xb, args)
        limit = LATENCY_TARGET * LATENCY_SLACK
        lt["goal"] = {"limit_ratio": limit, "ratio": sbs["ratio"], "judged": sbs["stable"],
                      "met": bool(lt.get("ok") and sbs["stable"] and sbs["ratio"] <= limit)}
        log(f"  latency goal: slim/original {sbs['ratio']:.3f} (limit {limit:.3f}), paired "
            f"{lt['paired']['ratio_median']:.3f}: {'met' if lt['goal']['met'] else 'not met'}")
    keys = [k for k in (f"round_to={rt}" for rt in ROUND_TOS) if k in slims]
    if keys:
        sbs = side_by_side({"original": model, **{k: slims[k] for k in keys}}, xb, args,
                           1e3 * lat_model.original_s)
        fl["side_by_side"] = sbs
        for k in keys:
            v = fl["variants"][k]
            speedup = sbs["ms"]["original"] / sbs["ms"][k]
            reduction = entry["macs"] / v["macs"]
            v.update({"ms": sbs["ms"][k], "original_ms": sbs["ms"]["original"], "speedup": speedup,
                      "macs_reduction": reduction, "efficiency": speedup / reduction, "judged": sbs["stable"]})
            log(f"  flops {FLOPS} {k}: speedup {speedup:.2f}x / MACs reduction {reduction:.2f}x = "
                f"{speedup / reduction:.3f}")
        auto = fl["variants"].get("round_to=auto", {})
        if "efficiency" in auto:
            fl["goal"] = {"min_efficiency": GOAL_AUTO_EFFICIENCY, "efficiency": auto["efficiency"],
                          "judged": sbs["stable"], "met": bool(sbs["stable"] and auto["efficiency"] >= GOAL_AUTO_EFFICIENCY)}
    entry["load_end"] = load_average()
    entry["seconds"] = time.perf_counter() - t_model
    return entry


# ------------------------------------------------------------------------------ output


def _f(v, fmt: str, dash: str = "—") -> str:
    return dash if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def table(results: dict) -> str:
    head = ["model", "GMACs", "profile first / cached (s)", "lat 0.5: slim / original side by side",
            "pair by pair", "method's own measured after / before", "MACs kept", "goal (b)",
            "eff. round_to None", "eff. round_to 8", "eff. round_to auto (MACs kept)", "goal (c)"]
    rows = []
    order = {m: i for i, m in enumerate(MODELS)}
    entries = sorted(results.get("models", {}).items(),
                     key=lambda kv: (order.get(kv[0].split("@")[0], len(order)), kv[0].split("@")[0], kv[0]))
    for name, e in entries:
        p, lt, fl = e.get("profile", {}), e.get("latency_target", {}), e.get("flops_half", {})
        prof = "error" if "error" in p else f"{_f(p.get('cold_s'), '.1f')} / {_f(p.get('cached_s'), '.2f')}"
        sbs = lt.get("side_by_side")
        if sbs:
            slim_ms = next(v for k, v in sbs["ms"].items() if k != "original")
            ratio = (f"{sbs['ratio']:.3f} ({slim_ms:.0f} / {sbs['ms']['original']:.0f} ms)"
                     + ("" if sbs["stable"] else " unstable"))
        else:
            ratio = "—"
        pair = (f"{lt['paired']['ratio_median']:.3f}" if lt.get("paired") else "—")
        d = lt.get("latency_details") or {}
        own = (f"{d['measured_after_s'] / d['measured_before_s']:.3f}" if d.get("measured_after_s") else "—")
        if lt.get("skipped"):
            own = "skipped"
        elif not lt.get("ok"):
            err = lt.get("error", {})
            own = err.get("type", "error")
            if lt.get("best_ms") and p.get("original_ms"):
                own += (f" (best {'measured' if lt.get('best_measured') else 'predicted'} "
                        f"{lt['best_ms'] / p['original_ms']:.3f})")
        goal_b = lt.get("goal", {})
        if goal_b:
            gb = "not judged" if not goal_b["judged"] else ("met" if goal_b["met"] else "not met")
        else:
            gb = "not met" if lt.get("error") else "—"
        effs = []
        for rt in ROUND_TOS:
            v = fl.get("variants", {}).get(f"round_to={rt}", {})
            cell = _f(v.get("efficiency"), ".3f") if v.get("ok", True) else v.get("error", {}).get("type", "error")
            if rt == "auto" and v.get("macs_ratio") is not None:
                cell += f" ({v['macs_ratio']:.3f})"
            effs.append(cell)
        goal_c = fl.get("goal", {})
        gc = "—" if not goal_c else ("not judged" if not goal_c["judged"] else ("met" if goal_c["met"] else "not met"))
        rows.append([name, _f(e.get("macs", 0) / 1e9 if e.get("macs") else None, ".3f"), prof, ratio, pair, own,
                     _f(lt.get("macs_ratio"), ".3f"), gb, *effs, gc])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    if results.get("not_run"):
        lines.append("")
        lines.append("Not run: " + ", ".join(f"{m} ({why})" for m, why in results["not_run"].items()))
    return "\n".join(lines)


def save(path: Path, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per model in a side-by-side round")
    ap.add_argument("--pairs", type=int, default=9, help="pairs for the pair-by-pair ratio of (b)")
    ap.add_argument("--attempts", type=int, default=3,
                    help="side-by-side measurements while unstable or disturbed, at most")
    ap.add_argument("--wait-quiet", type=float, default=600,
                    help="before each measurement wait at most this many seconds for other processes to use "
                         "less than --quiet-limit cores")
    ap.add_argument("--quiet-limit", type=float, default=0.3)
    ap.add_argument("--busy-limit", type=float, default=0.5,
                    help="a side-by-side round during which other processes used more cores is measured again")
    ap.add_argument("--max-drift", type=float, default=1.3,
                    help="a round whose original is this many times off its profiled latency is measured again")
    ap.add_argument("--json", default=str(REPO / "docs" / "latency_goals.json"))
    ap.add_argument("--cache", default=None, help="folder for the latency caches (default: a new temp folder)")
    ap.add_argument("--force", action="store_true", help="measure models already in the JSON again")
    ap.add_argument("--skip-latency-target", action="store_true", help="goal (b) not run: only (a) and (c)")
    ap.add_argument("--stop-after-min", type=float, default=None,
                    help="start no new model after this many minutes (the rest are recorded as not run)")
    ap.add_argument("--label", default=None,
                    help="store the models as NAME@LABEL (a repeat run next to the first one, e.g. --label 2)")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of the JSON and exit")
    args = ap.parse_args(argv)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("models", {})
    if args.table:
        print(table(results))
        return 0
    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    cache_root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="fxprune-latency-goals-"))
    cache_root.mkdir(parents=True, exist_ok=True)
    run = {"command": "python -m benches.experiments.latency_goals " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cores": os.cpu_count(),
           "platform": f"{platform.system()} {platform.machine()}", "threads": args.threads, "batch": args.batch,
           "dtype": "float32", "repeats": args.repeats, "pairs": args.pairs, "attempts": args.attempts,
           "wait_quiet_s": args.wait_quiet, "quiet_limit_cores": args.quiet_limit, "busy_limit_cores": args.busy_limit,
           "max_drift": args.max_drift,
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "fxprune": getattr(fxprune, "__version__", None)},
           "git_commit": git_commit(), "load_average": load_average(), "models": names}
    results.setdefault("runs", []).append(run)
    results["goals"] = {"profile_cold_s": GOAL_PROFILE_COLD_S, "profile_cached_s": GOAL_PROFILE_CACHED_S,
                        "profile_model": PROFILE_GOAL_MODEL, "latency_target": LATENCY_TARGET,
                        "latency_slack": LATENCY_SLACK, "auto_efficiency": GOAL_AUTO_EFFICIENCY, "flops": FLOPS,
                        "efficiency": "speedup (original / slim latency) / MACs reduction (original / slim MACs)"}
    results.setdefault("not_run", {})
    start = time.perf_counter()
    for name in names:
        key = f"{name}@{args.label}" if args.label else name
        if key in results["models"] and not args.force:
            log(f"{key}: in {path.name} already (--force to measure again)")
            results["not_run"].pop(key, None)
            continue
        if args.stop_after_min is not None and time.perf_counter() - start > 60 * args.stop_after_min:
            results["not_run"][key] = f"not started: the run's {args.stop_after_min:g}-minute budget was spent"
            log(f"{key}: not started (time budget)")
            save(path, results)
            continue
        log(f"{name}: batch {args.batch}, {args.threads} threads, fp32, load {load_average()}")
        try:
            entry = run_model(name, args, cache_root)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next model
            entry = {"model": name, "error": error_json(exc), "date": time.strftime("%Y-%m-%d %H:%M")}
            log(f"{name}: failed: {type(exc).__name__}: {exc}")
        entry["run"] = len(results["runs"]) - 1
        results["models"][key] = entry
        results["not_run"].pop(key, None)
        save(path, results)
        log(f"{key}: done in {entry.get('seconds', 0):.0f} s")
    run["seconds"] = time.perf_counter() - start
    save(path, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
