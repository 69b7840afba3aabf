"""Structured channel groups (issue 17): fxprune and Torch-Pruning side by side at half the MACs, and
how much of fxprune's cut comes from the groups that only became prunable through that work.

Run from the repository root (a script, not a test)::

    python -m benches.experiments.tp_structured                        # every model of MODELS (resumable)
    python -m benches.experiments.tp_structured --models swin_t,vit_b_32 --force
    python -m benches.experiments.tp_structured --quick                # regnet_x_400mf, shufflenet_v2_x0_5 at 64x64
    python -m benches.experiments.tp_structured --table                # rewrite the Markdown from the JSON

Per model (torchvision, ``weights=None``, seed 0, eval; zero-initialised weights given small random values
and tiny layer scales set to 1, as the zoo does (`fxprune.verify.randomize_degenerate_weights`); the zoo's
example input, `fxprune.zoo.catalog`: 1x3x224x224, MViT 1x3x16x224x224; ``--size`` shrinks it for CNNs):

A. **Side by side at MACs 0.5 of the original.**

   * fxprune: ``compress(model, "l1", x, flops=0.5, grouped="auto")`` (heads "whole", the default):
     converted or the error, MACs before/after, params, the verification's max relative error, seconds.
   * Torch-Pruning (`benches.harness.peer`): L1 ``MagnitudeImportance``, ``global_pruning=False``, one
     shot, the classifier left alone (`peer.classifier_layers`), its own recipe for attention models
     (`peer.torchvision_setup`: ViT ``round_to`` = heads and ``hidden_dim`` reset; Swin, MaxViT, MViT
     ``num_heads`` of the q/k/v Linear and the head attributes reset). ``pruning_ratio`` is searched
     (`peer.prune_to_macs`: regula falsi with bisection, at most ``--tries`` prunings) for MACs in
     ``0.5 +- --band``. Converted means: a try at most 0.5 + band, whose forward runs with finite outputs
     of the original's shapes. A crash, or MACs that stay above the band, is "not converted" with the
     exception's type and message.
   * MACs of both by one counter (`benches.harness.metrics.count_macs`: FlopCounterMode, FLOPs = 2 x MACs).

B. **The share of fxprune's cut from structured groups.** Every channel group the plan prunes is
   classified by `fxprune.analysis.group_structures` (a reshape's channel split, a grouped conv pruned
   with equal positions, attention heads, a computed conv weight). The MACs those groups remove are the
   cost model's drop when only they take their kept counts from the plan and every other group stays
   full: ``total - cost.macs(channels.keep_roots({g: plan.keep[g] for g in structured}))``, next to the
   plan's whole drop (``total - cost.macs(resolved keep_roots, removed nodes)``); share = their ratio.
   The analysis is redone on the same model and inputs (the recipe's group fingerprint must match).

Each model runs in two child processes, fxprune's and Torch-Pruning's, each under ``--timeout`` seconds
and an address-space limit of ``--max-memory`` GiB over its size after the imports (the zoo worker's
`_apply_limits`), first in line for the OOM killer, so a crash, a hang or an out-of-memory costs that
tool on that model only. Results go to ``--json`` (default docs/tp_structured.json; one entry per model,
replaced when measured again; models already there are skipped unless ``--force``) and the Markdown table
to ``--md`` (default docs/tp_structured.md), after every model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# smallest first, the heaviest (regnet_y_32gf, vit_l_16, regnet_x_32gf, the ResNeXt-101s) last
MODELS = [
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "regnet_x_400mf", "regnet_y_400mf", "regnet_x_800mf", "regnet_y_800mf", "regnet_x_1_6gf", "regnet_y_1_6gf",
    "regnet_x_3_2gf", "regnet_y_3_2gf", "vit_b_32", "resnext50_32x4d", "maxvit_t", "swin_t", "swin_v2_t",
    "regnet_x_8gf", "regnet_y_8gf", "swin_s", "swin_v2_s", "vit_b_16", "swin_b", "swin_v2_b", "regnet_x_16gf",
    "regnet_y_16gf", "mvit_v2_s", "mvit_v1_b", "resnext101_32x8d", "resnext101_64x4d", "regnet_x_32gf",
    "vit_l_16", "regnet_y_32gf",
]
TOOLS = ("fxprune", "torch_pruning")
TARGET = 0.5
QUICK = {"models": "regnet_x_400mf,shufflenet_v2_x0_5", "size": 64}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------ one model, one tool


def build(name: str, size: int | None = None):
    """(model, ExampleInputs, input shape) of a torchvision model as the zoo builds it (module docstring)."""
    import torch

    from fxprune.models import build_model
    from fxprune.verify import randomize_degenerate_weights
    from fxprune.zoo.catalog import select
    from fxprune.zoo.worker import _inputs

    entry = next(e for e in select(("classification", "video"), name) if e.name == name)
    shapes = [list(s) for s in entry.input_shapes]
    if size:
        shapes = [s[:-2] + [size, size] for s in shapes]
    torch.manual_seed(0)
    model = build_model(entry.spec, **entry.build_kwargs).eval()
    randomize_degenerate_weights(model)
    return model, _inputs({"input_shapes": shapes}), shapes[0]


def structured_cut(model, inputs, slim) -> dict:
    """Part B: MACs removed in all and by the groups `group_structures` names (module docstring)."""
    from fxprune.analysis import analyze, group_structures, with_grouped
    from fxprune.passes.plan import resolve
    from fxprune.recipe import fingerprint, plan_of

    recipe = slim.fxprune_recipe
    analysis = with_grouped(analyze(model, inputs), recipe.get("grouped", "whole"), recipe.get("heads", "whole"),
                            recipe.get("layernorm", "boundary"))
    if fingerprint(analysis.channels) != recipe["groups"]:
        raise RuntimeError("the analysis redone differs from compress's (group fingerprint)")
    channels, cost = analysis.channels, analysis.cost
    plan = plan_of(recipe)
    resolved = resolve(channels, plan)
    total = cost.total_macs
    removed = total - cost.macs(resolved.keep_roots, resolved.removed_nodes)
    kinds = group_structures(analysis)
    pruned = {g for g, kept in plan.keep.items() if len(kept) < channels.groups[g].n_units}

    def drop(groups) -> float:
        return total - cost.macs(channels.keep_roots({g: plan.keep[g] for g in groups}))

    structured = {g for g in pruned if g in kinds}
    by_kind = {}
    for kind in sorted({k for g in structured for k in kinds[g]}):
        mine = {g for g in structured if kind in kinds[g]}
        by_kind[kind] = {"groups_pruned": len(mine), "macs_removed": drop(mine)}
    new = drop(structured)
    return {
        "macs_total": total, "macs_removed": removed, "macs_removed_structured": new,
        "share_structured_pct": 100.0 * new / removed if removed else 0.0,
        "macs_removed_others_only": drop(pruned - structured),
        "groups": len(channels.groups), "groups_prunable": len(channels.prunable_groups),
        "groups_structured": len(kinds), "groups_pruned": len(pruned), "groups_pruned_structured": len(structured),
        "kinds": by_kind, "removed_branches": len(plan.remove_branches),
        "dropped_concat_inputs": len(plan.drop_concat_inputs),
    }


def measure_fxprune(model, inputs, flops: float = TARGET) -> dict:
    """Part A (fxprune) and part B of one model."""
    import fxprune
    from benches.harness.metrics import count_macs, count_params

    out: dict = {"converted": False, "call": f'compress(model, "l1", x, flops={flops}, grouped="auto")'}
    macs = count_macs(model, inputs)
    out.update(macs_before=macs, params_before=count_params(model))
    t0 = time.perf_counter()
    try:
        slim = fxprune.compress(model, "l1", inputs, flops=flops, grouped="auto")
    except Exception as exc:  # noqa: BLE001 - fxprune's failure is the result
        out.update(seconds=time.perf_counter() - t0, error=_error(exc))
        return out
    out["seconds"] = time.perf_counter() - t0
    rep = slim.fxprune_report
    after = count_macs(slim, inputs)
    out.update(converted=True, macs_after=after, macs_fraction=after / macs, params_after=count_params(slim),
               max_rel_error=rep.max_rel_error, max_abs_error=rep.max_abs_error, cost_macs_before=rep.macs_before,
               cost_macs_after=rep.macs_after, groups=rep.groups, prunable_groups=rep.prunable_groups,
               boundaries=len(rep.boundaries), verification_note=(rep.details or {}).get("verification"))
    try:
        out["structures"] = structured_cut(model, inputs, slim)
    except Exception as exc:  # noqa: BLE001 - part B failing leaves part A standing
        out["structures"] = {"error": _error(exc)}
    return out


def measure_torch_pruning(model, inputs, target: float = TARGET, band: float = 0.01, tries: int = 8) -> dict:
    """Part A (Torch-Pruning) of one model."""
    import torch

    from benches.harness.metrics import count_macs, count_params, output_shapes
    from benches.harness.peer import prune_to_macs, torch_pruning_status, torchvision_setup
    from fxprune.passes.inputs import output_leaves

    tp, status = torch_pruning_status()
    out: dict = {"converted": False, "version": status}
    if tp is None:
        out["error"] = status
        return out
    macs = count_macs(model, inputs)
    setup = torchvision_setup(model, global_pruning=False)
    out.update(macs_before=macs, params_before=count_params(model), recipe=setup.recipe, global_pruning=False,
               importance="MagnitudeImportance(p=1)")
    t0 = time.perf_counter()
    try:
        res = prune_to_macs(model, inputs, target, macs_before=macs, tolerance=band, over=band, max_tries=tries,
                            setup=setup)
    except Exception as exc:  # noqa: BLE001 - the original model's own run failing
        out.update(seconds=time.perf_counter() - t0, error=_error(exc))
        return out
    out.update(seconds=time.perf_counter() - t0, tries=res.tries, pruning_ratio=res.ratio)
    if not res.ok:
        out["error"] = res.error
        return out
    pruned = res.model
    try:
        with torch.no_grad():
            leaves = output_leaves(inputs.call(pruned.eval()))
        finite = all(bool(torch.isfinite(t).all()) for _, t in leaves)
        shapes_ok = [tuple(t.shape) for _, t in leaves] == output_shapes(model, inputs)
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"forward of the pruned model: {_error(exc)}"
        return out
    after = count_macs(pruned, inputs)
    out.update(macs_after=after, macs_fraction=after / macs, params_after=count_params(pruned), output_finite=finite,
               output_shape_ok=shapes_ok, in_band=abs(after / macs - target) <= band + 1e-12)
    if not finite or not shapes_ok:
        out["error"] = "the pruned model's output " + ("is not finite" if not finite else "changed its shape")
        return out
    out["converted"] = True
    return out


def measure(name: str, tool: str, size: int | None = None, tries: int = 8, band: float = 0.01) -> dict:
    """One tool on one model, in this process: {"input", "tool": {...}}."""
    model, inputs, shape = build(name, size)
    if tool == "fxprune":
        result = measure_fxprune(model, inputs)
    else:
        result = measure_torch_pruning(model, inputs, TARGET, band, tries)
    return {"input": shape, tool: result}


# ------------------------------------------------------------------------------ child processes


def _child(args) -> int:
    """``--child TOOL --model NAME --result FILE``: measure, write the result, exit."""
    try:  # first in line for the OOM killer: the machine is shared with other long jobs
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    import torch

    from fxprune.zoo.worker import _apply_limits, _die_with_parent

    if args.parent:
        _die_with_parent(args.parent, None)
    torch.set_num_threads(1)
    _apply_limits({"max_memory": int(args.max_memory * 2**30), "timeout_s": args.timeout}, threads=1)
    try:
        result = measure(args.model, args.child, args.size, args.tries, args.band)
    except MemoryError as exc:
        result = {args.child: {"converted": False, "error": f"over the memory limit ({args.max_memory:g} GiB): "
                                                            f"{_error(exc)}"}}
    except Exception as exc:  # noqa: BLE001 - building the model failed
        result = {args.child: {"converted": False, "error": _error(exc)}}
    tmp = Path(args.result).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, args.result)
    return 0


def run_child(name: str, tool: str, args, work: Path) -> dict:
    """One tool on one model in a child process under the limits; its result, or why there is none."""
    result_file, log_file = work / f"{name}.{tool}.json", work / f"{name}.{tool}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benches.experiments.tp_structured", "--child", tool, "--model", name,
           "--result", str(result_file), "--parent", str(os.getpid()), "--timeout", str(args.timeout),
           "--max-memory", str(args.max_memory), "--tries", str(args.tries), "--band", str(args.band)]
    if args.size:
        cmd += ["--size", str(args.size)]
    t0 = time.perf_counter()
    with open(log_file, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    wall = time.perf_counter() - t0
    if result_file.exists():
        result = json.loads(result_file.read_text())
        result[tool]["wall_s"] = wall
        return result
    if rc is None:
        why = f"Timeout: killed after {args.timeout:g} s"
    else:
        last = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [""]
        sig = f" (signal {-rc}: {signal.Signals(-rc).name})" if rc < 0 else ""
        why = f"Crash: exit code {rc}{sig}, no result; last output: {last[0][:200]}"
    return {tool: {"converted": False, "error": why, "wall_s": wall}}


def run_model(name: str, args, work: Path) -> dict:
    entry: dict = {"model": name, "date": time.strftime("%Y-%m-%d %H:%M")}
    for tool in TOOLS:
        log(f"{name}: {tool}")
        part = run_child(name, tool, args, work)
        entry["input"] = part.get("input", entry.get("input"))
        entry[tool] = part[tool]
        r = part[tool]
        log(f"  {tool}: " + (f"MACs {r['macs_fraction']:.4f}" if r.get("converted") else r.get("error", "?"))
            + f" ({r.get('wall_s', 0):.0f} s)")
    before = entry["fxprune"].get("macs_before") or entry["torch_pruning"].get("macs_before")
    if before:
        entry["macs"] = before
        entry["params"] = entry["fxprune"].get("params_before") or entry["torch_pruning"].get("params_before")
    return entry


# ------------------------------------------------------------------------------ output


def _f(v, fmt: str, dash: str = "—") -> str:
    return dash if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _g(macs) -> str:
    from fxprune.report import human

    return "—" if macs is None else human(macs)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary(results: dict) -> str:
    models = results.get("models", {})
    fx = [m for m, e in models.items() if e.get("fxprune", {}).get("converted")]
    tp = [m for m, e in models.items() if e.get("torch_pruning", {}).get("converted")]
    only_fx = [m for m in fx if m not in tp]
    only_tp = [m for m in tp if m not in fx]
    return (f"fxprune converts {len(fx)} of {len(models)}; TP converts {len(tp)} of {len(models)}; "
            f"models fxprune converts and TP does not: {', '.join(only_fx) or 'none'}; "
            f"the reverse: {', '.join(only_tp) or 'none'}")


HEAD = ["model", "input", "MACs", "FLOPs (2×MACs)", "fxprune converted", "fxprune MACs kept",
        "fxprune max rel. error", "fxprune s", "TP converted", "TP MACs kept", "TP pruning_ratio (tries)",
        "TP error", "fxprune MACs removed", "fxprune FLOPs removed", "MACs removed by structured groups",
        "share of the cut (%)", "structured groups pruned / all pruned (kinds)"]


def _error_text(error: str, setting: dict) -> str:
    """An error for the table: a bare MemoryError says which limit it ran into."""
    if re.fullmatch(r"MemoryError:?\s*", error or "") and setting.get("max_memory_gib"):
        return f"MemoryError (over the {setting['max_memory_gib']:g} GiB address-space limit of its process)"
    return _cell(error)


def table(results: dict, order: list | None = None) -> str:
    models, st_run = results.get("models", {}), results.get("setting", {})
    names = [m for m in (order or MODELS) if m in models] + [m for m in models if m not in (order or MODELS)]
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "|".join("---" for _ in HEAD) + "|"]
    for name in names:
        e = models[name]
        fx, tp = e.get("fxprune", {}), e.get("torch_pruning", {})
        st = fx.get("structures") or {}
        macs = e.get("macs")
        kinds = ", ".join(f"{k} {v['groups_pruned']}" for k, v in st.get("kinds", {}).items())
        cut = "—" if "groups_pruned" not in st else (
            f"{st['groups_pruned_structured']} / {st['groups_pruned']}" + (f" ({kinds})" if kinds else ""))
        tries = tp.get("tries") or []
        row = [
            name, "x".join(map(str, e.get("input", []))) or "—", _g(macs), _g(None if macs is None else 2 * macs),
            "yes" if fx.get("converted") else f"no: {_error_text(fx.get('error', '?'), st_run)}",
            _f(fx.get("macs_fraction"), ".4f"), _f(fx.get("max_rel_error"), ".1e"), _f(fx.get("seconds"), ".1f"),
            "yes" if tp.get("converted") else "no", _f(tp.get("macs_fraction"), ".4f"),
            f"{_f(tp.get('pruning_ratio'), '.4f')} ({len(tries)})" if tries else "—",
            _error_text(tp.get("error", ""), st_run) if not tp.get("converted") else (
                "" if tp.get("in_band", True) else f"converted, but no try within 0.5 ± {st_run.get('band', 0.01):g}"),
            _g(st.get("macs_removed")), _g(None if st.get("macs_removed") is None else 2 * st["macs_removed"]),
            _g(st.get("macs_removed_structured")), _f(st.get("share_structured_pct"), ".1f"), cut,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    st = results.get("setting", {})
    runs = results.get("runs", [])
    text = [
        "# Structured channel groups: fxprune and Torch-Pruning at half the MACs",
        "",
        "Generated by `benches/experiments/tp_structured.py` (see its docstring for the method). "
        f"{st.get('description', '')}",
        "",
        f"Versions: {st.get('versions', {})}; last command: `{st.get('command', '')}`"
        + (f"; run time of the last run {runs[-1]['seconds'] / 60:.1f} min" if runs else "") + ".",
        "",
        "MACs kept = MACs of the slim model / the original's, both counted by FlopCounterMode "
        "(`benches.harness.metrics.count_macs`); FLOPs = 2 × MACs. fxprune's error = max relative difference "
        "to the masked original. \"MACs removed\" and \"by structured groups\" come from fxprune's cost model "
        "(exact for the emitted graph); the share is the second over the first. Structured groups: "
        "`fxprune.analysis.group_structures` (split = a reshape's channel split, grouped_equal = a grouped conv "
        "with equal positions per group, heads = attention heads, computed_weight = a conv whose weight is "
        "computed).",
        "",
        summary(results),
        "",
        table(results),
        "",
    ]
    return "\n".join(text)


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def setting(args, command: str) -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    size = f"{args.size}x{args.size} inputs" if args.size else "the zoo's inputs (224x224; MViT 16x224x224)"
    return {
        "command": command, "commit": commit, "target_macs": TARGET, "band": args.band, "tp_tries": args.tries,
        "timeout_s": args.timeout, "max_memory_gib": args.max_memory, "size": args.size,
        "versions": {"torch": version("torch"), "torchvision": version("torchvision"),
                     "torch_pruning": version("torch-pruning"), "fxprune_commit": commit},
        "description": (f"CPU, 1 thread per child process, {size}, torchvision weights=None (seed 0, degenerate "
                        f"weights randomised as the zoo does), eval; MACs target {TARGET} (Torch-Pruning: "
                        f"{TARGET} ± {args.band}, at most {args.tries} prunings); each tool in its own process, "
                        f"timeout {args.timeout:g} s, address space +{args.max_memory:g} GiB."),
    }


# ------------------------------------------------------------------------------ main


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated model names (default: MODELS; --quick: "
                                                   f"{QUICK['models']})")
    ap.add_argument("--size", type=int, default=None, help="input height and width instead of the zoo's (CNNs)")
    ap.add_argument("--tries", type=int, default=8, help="Torch-Pruning prunings of the ratio search, at most")
    ap.add_argument("--band", type=float, default=0.01, help="Torch-Pruning's MACs band around 0.5")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model and tool")
    ap.add_argument("--max-memory", type=float, default=12, help="GiB of address space per child over its imports")
    ap.add_argument("--force", action="store_true", help="measure models already in the JSON again")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK['models']} at {QUICK['size']}x{QUICK['size']} into a temp JSON")
    ap.add_argument("--json", default=None, help="results (default docs/tp_structured.json; --quick: a temp file)")
    ap.add_argument("--md", default=None, help="Markdown table (default docs/tp_structured.md; --quick: a temp file)")
    ap.add_argument("--table", action="store_true", help="write and print the Markdown of the JSON, measure nothing")
    # a child process: one tool on one model
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.size = args.models or QUICK["models"], args.size or QUICK["size"]
        args.force = True
    args.models = args.models or ",".join(MODELS)
    tmp = Path(tempfile.gettempdir())
    args.json = args.json or str(tmp / "tp_structured_quick.json" if args.quick else REPO / "docs" / "tp_structured.json")
    args.md = args.md or str(tmp / "tp_structured_quick.md" if args.quick else REPO / "docs" / "tp_structured.md")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return _child(args)
    path, md = Path(args.json), Path(args.md)
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.table:
        md.write_text(markdown(results))
        print(markdown(results))
        return 0
    command = "python -m benches.experiments.tp_structured " + " ".join(argv if argv is not None else sys.argv[1:])
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if not re.fullmatch(r"[A-Za-z0-9_]+", m)]
    if unknown:
        print(f"bad model names: {unknown}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    st = setting(args, command)  # once: the commit is the code's, whatever is committed during the run
    work = Path(tempfile.mkdtemp(prefix="tp-structured-"))
    done = 0
    for name in names:
        results = json.loads(path.read_text()) if path.exists() else {}
        old = results.get("models", {}).get(name, {})
        if not args.force and all(tool in old for tool in TOOLS):
            log(f"{name}: in {path.name} already (--force to measure again)")
            continue
        t0 = time.perf_counter()
        entry = run_model(name, args, work)
        entry.update(seconds=time.perf_counter() - t0, commit=st["commit"])
        results = json.loads(path.read_text()) if path.exists() else {}  # re-read: keep what others wrote
        results.setdefault("models", {})[name] = entry
        results["setting"] = st
        save(path, results)
        md.write_text(markdown(results))
        done += 1
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("runs", []).append({"command": command, "models": done, "seconds": time.perf_counter() - start,
                                           "date": time.strftime("%Y-%m-%d %H:%M")})
    save(path, results)
    md.write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
