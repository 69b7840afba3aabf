"""Issue 8's goals, judged from a run's numbers: each is met, missed, or not measured (and why).

* compile: trace + shapes + analysis + rewrite (no method, no verification) of `model` under 1 s,
  and at least 3x faster than Torch-Pruning building its dependency graph and pruning it;
* speedup: on the CPU (fp32, eager) at `flops` and `batch`, fxprune's measured speedup is at least
  0.85 x its MACs reduction, and its speedup per MACs reduction is no worse than Torch-Pruning's:
  judged on the pair-by-pair timing of the two slim models where the run has one (within the
  noise those pairs show), else on the round-robin medians (within `noise`); a speedup from an
  unstable latency (see `fxprune.latency.LatencyMeasurer`) is not judged (met None);
* coverage: fxprune converts every model Torch-Pruning converts.

Example::

    >>> from benches.harness.goals import evaluate_goals
    >>> [g["met"] for g in evaluate_goals({"models": {}})]
    [None, None, None, None, None]
"""
from __future__ import annotations

COMPILE_LIMIT_S = 1.0
COMPILE_VS_PEER = 3.0
MIN_EFFICIENCY = 0.85


def coverage(results: dict) -> dict:
    """Per model and tool: slim models built / asked for, and the first error."""
    out = {}
    for name, entry in results.get("models", {}).items():
        row = {}
        for tool in ("fxprune", "torch_pruning"):
            variants = [v for v in entry.get("variants", []) if v["tool"] == tool]
            if not variants:
                continue
            errors = [v["error"] for v in variants if not v["ok"]]
            row[tool] = {"converted": len(variants) - len(errors), "asked": len(variants),
                         "error": errors[0] if errors else None}
        if "error" in entry:
            row["fxprune"] = {"converted": 0, "asked": 0, "error": entry["error"]}
        out[name] = row
    return out


def _cpu_latency(entry: dict, batch: int) -> dict | None:
    return next((lat for lat in entry.get("latency", []) if lat["device"] == "cpu" and lat["dtype"] == "float32"
                 and not lat["torch_compile"] and lat["batch"] == batch and "error" not in lat), None)


def _goal(goal: str, met, detail: str) -> dict:
    return {"goal": goal, "met": met, "detail": detail}


def evaluate_goals(results: dict, model: str = "resnet50", flops: float = 0.5, batch: int = 32,
                   noise: float = 0.03) -> list[dict]:
    entry = results.get("models", {}).get(model)
    missing = f"not measured: {model} is not in this run"
    goals = []
    # 1. compile speed
    comp = (entry or {}).get("compile", {})
    name1 = f"compile of {model} (trace + shapes + analysis + rewrite, no verification) under {COMPILE_LIMIT_S:g} s"
    if "compile_s" in comp:
        goals.append(_goal(name1, comp["compile_s"] < COMPILE_LIMIT_S, f"{1000 * comp['compile_s']:.0f} ms"))
    else:
        goals.append(_goal(name1, None, comp.get("error", missing) if entry else missing))
    name2 = f"compile of {model} at least {COMPILE_VS_PEER:g}x faster than Torch-Pruning's dependency graph + pruning"
    peer = comp.get("torch_pruning", {})
    if "compile_s" in comp and "total" in peer:
        ratio = peer["total"] / comp["compile_s"]
        ratio_m = peer["total"] / comp["compile_with_method_s"]
        goals.append(_goal(name2, ratio >= COMPILE_VS_PEER,
                           f"Torch-Pruning {1000 * peer['total']:.0f} ms / fxprune {1000 * comp['compile_s']:.0f} ms "
                           f"= {ratio:.2f}x (with fxprune's method pass, "
                           f"{1000 * comp['compile_with_method_s']:.0f} ms: {ratio_m:.2f}x)"))
    else:
        why = peer.get("error") or results.get("torch_pruning", {}).get("message") or "no Torch-Pruning timing"
        goals.append(_goal(name2, None, f"not measured: {why}" if entry else missing))
    # 2. realized speedup
    lat = _cpu_latency(entry or {}, batch)
    fx_key, tp_key = f"fxprune {flops:g}", f"torch_pruning {flops:g}"
    name3 = (f"CPU speedup of {model} at {flops:g} of the FLOPs (batch {batch}) >= {MIN_EFFICIENCY} x its MACs "
             "reduction")
    fx = (lat or {}).get("slim", {}).get(fx_key)
    if fx and not _stable(fx):
        goals.append(_goal(name3, None, f"not judged: latency unstable ({fx.get('reason')})"))
    elif fx:
        goals.append(_goal(name3, fx["efficiency"] >= MIN_EFFICIENCY,
                           f"speedup {fx['speedup']:.2f}x / MACs reduction {fx['macs_reduction']:.2f}x = "
                           f"{fx['efficiency']:.2f}"))
    else:
        goals.append(_goal(name3, None, f"not measured: no CPU fp32 eager batch-{batch} latency of {fx_key}"
                           if entry else missing))
    name4 = f"{model}'s speedup per MACs reduction no worse than Torch-Pruning's at the same MACs (batch {batch})"
    tp = (lat or {}).get("slim", {}).get(tp_key)
    h2h = (entry or {}).get("head_to_head", {})
    if "ratio_median" in h2h and h2h["flops"] == flops and h2h["batch"] == batch:
        if h2h.get("stable", True):
            goals.append(_head_to_head_goal(name4, h2h, fx, tp))
        else:
            goals.append(_goal(name4, None, f"not judged: pair-by-pair timing unstable ({h2h.get('reason')})"))
    elif fx and tp and not (_stable(fx) and _stable(tp)):
        why = "; ".join(f"{who} {s.get('reason')}" for who, s in (("fxprune", fx), ("Torch-Pruning", tp))
                        if not _stable(s))
        goals.append(_goal(name4, None, f"not judged: latency unstable ({why})"))
    elif fx and tp:
        goals.append(_goal(name4, fx["efficiency"] >= tp["efficiency"] * (1 - noise),
                           f"fxprune {fx['speedup']:.2f}x at MACs /{fx['macs_reduction']:.2f} "
                           f"({fx['efficiency']:.2f}); Torch-Pruning {tp['speedup']:.2f}x at MACs "
                           f"/{tp['macs_reduction']:.2f} ({tp['efficiency']:.2f}); timing noise allowance "
                           f"{100 * noise:.0f}%"))
    else:
        goals.append(_goal(name4, None, "not measured: " + ("no Torch-Pruning latency" if fx else
                                                            "no fxprune latency") if entry else missing))
    # 3. coverage
    cov = coverage(results)
    name5 = "fxprune converts every model Torch-Pruning converts"
    tp_models = [m for m, c in cov.items() if c.get("torch_pruning", {}).get("converted")]
    if not any("torch_pruning" in c for c in cov.values()):
        goals.append(_goal(name5, None, "not measured: no Torch-Pruning run"))
    else:
        lost = [m for m in tp_models if c_full(cov[m]) is False]
        only_fx = [m for m, c in cov.items() if c_full(c) and not c.get("torch_pruning", {}).get("converted")]
        goals.append(_goal(name5, not lost, f"Torch-Pruning converts {len(tp_models)}/{len(cov)}, fxprune "
                           f"{sum(bool(c_full(c)) for c in cov.values())}/{len(cov)}"
                           + (f"; fxprune misses {', '.join(lost)}" if lost else "")
                           + (f"; only fxprune: {', '.join(only_fx)}" if only_fx else "")))
    return goals


def _head_to_head_goal(name: str, h2h: dict, fx: dict | None, tp: dict | None) -> dict:
    """Judged on the pair-by-pair timing: fxprune's efficiency relative to Torch-Pruning's is
    (TP time / fxprune time) x (TP MACs reduction / fxprune MACs reduction); met when it is at
    least 1 minus the timing noise, half the interquartile range of the per-pair ratios (>= 1%)."""
    mr = h2h["macs_reduction"]
    relative = (1 / h2h["ratio_median"]) * (mr["torch_pruning"] / mr["fxprune"])
    noise = max(0.01, (h2h["ratio_q3"] - h2h["ratio_q1"]) / 2 / h2h["ratio_median"])
    detail = (f"timed pair by pair ({h2h['pairs']} pairs): fxprune / Torch-Pruning time {h2h['ratio_median']:.3f} "
              f"(quartiles {h2h['ratio_q1']:.3f}-{h2h['ratio_q3']:.3f}) at MACs /{mr['fxprune']:.2f} vs "
              f"/{mr['torch_pruning']:.2f}: fxprune's speedup per MACs reduction is {relative:.3f} x "
              f"Torch-Pruning's (noise {100 * noise:.1f}%)")
    if fx and tp and _stable(fx) and _stable(tp):
        detail += (f"; round-robin medians: fxprune {fx['speedup']:.2f}x ({fx['efficiency']:.2f}), "
                   f"Torch-Pruning {tp['speedup']:.2f}x ({tp['efficiency']:.2f})")
    return _goal(name, relative >= 1 - noise, detail)


def _stable(slim: dict) -> bool:
    """A slim model's speedup is a result (runs before latencies were judged count as stable)."""
    return slim.get("stable", True) and slim.get("speedup") is not None


def c_full(row: dict) -> bool:
    """fxprune built every slim model asked of it for this model."""
    fx = row.get("fxprune")
    return bool(fx) and fx["asked"] > 0 and fx["converted"] == fx["asked"]
