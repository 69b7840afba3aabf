"""Tables of the records: mean ± 95 % interval over seeds, paired differences, budget checks;
written between markers in docs/results.md so hand-written readings around them survive."""
from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

from .spec import Spec
from .stats import Interval, mean_ci, paired

BEGIN, END = "<!-- evidence:begin -->", "<!-- evidence:end -->"
_AFTER_TITLE = {"none": "acc % no FT", "finetune": "acc % after FT", "scratch": "acc % from scratch"}


def _primary(after: tuple) -> str:
    return next(a for a in ("finetune", "scratch", "none") if a in after)


def _verdict(a: Interval, b: Interval) -> str:
    if a.n < 2 or b.n < 2:
        return "n<2"
    return {1: "above", -1: "below", 0: "overlap"}[a.apart_from(b)]


def _note(records: list) -> str:
    s = [r.get("summary") or {} for r in records]
    method = records[0].get("fxprune_method")
    if method == "gal":
        blocks = sorted(len(x.get("removed_blocks") or []) for x in s)
        branches = sorted(len(x.get("removed_branches") or []) for x in s)
        parts = []
        if any(blocks):
            parts.append(f"blocks removed {'/'.join(map(str, blocks))}")
        if any(branches):
            parts.append(f"branches removed {'/'.join(map(str, branches))}")
        return "; ".join(parts)
    if method == "metapruning":
        acc = [x.get("search_best_accuracy") for x in s if x.get("search_best_accuracy") is not None]
        held = [x["pruningnet_heldout"][-1] for x in s if x.get("pruningnet_heldout")]
        text = f"search best held-out acc {min(acc):.3f}-{max(acc):.3f}" if acc else ""
        if held:
            text += (f"; PruningNet on sampled structures {min(h['heldout_accuracy'] for h in held):.3f}-"
                     f"{max(h['heldout_accuracy'] for h in held):.3f} held-out after "
                     f"{'/'.join(str(h['epochs']) for h in held)} epochs")
            here = [a for r in records for t in _last_round(r).get("per_target", [])
                    if _same(t.get("flops"), r["target"]) for a in t["accuracy"]]
            if here:  # the probed structures feasible at this cell's target, every seed
                text += f" (at this target: min {min(here):.3f}, median {statistics.median(here):.3f})"
        return text
    if method == "gate_decorator":
        ticks = [x.get("ticks") for x in s if x.get("ticks") is not None]
        return f"ticks {min(ticks)}-{max(ticks)}" if ticks and max(ticks) else ""
    return ""


def _paired_verdict(d: Interval) -> str:
    """Whether the paired difference's 95 % interval excludes zero."""
    if d.n < 2:
        return "n<2"
    return "above" if d.low > 0 else "below" if d.high < 0 else "includes 0"


def comparison_table(exp, primary: str, acc: dict) -> str:
    """The experiment's `compare` pairs at one target (`acc`: method -> evaluation -> seed ->
    accuracy): the paired difference over the seeds both
    have (its 95 % interval; 'above' when it excludes zero) next to the verdict on the two
    methods' own intervals (the stricter test the goals name)."""
    rows = []
    for key, other in exp.compare:
        if key not in acc or other not in acc:
            continue
        me, them = acc[key][primary], acc[other][primary]
        d = paired(me, them)
        per_seed = ", ".join(f"{(me[s] - them[s]) * 100:+.1f}" for s in sorted(set(me) & set(them)))
        rows.append([f"{key} vs {other}", str(d.n), d.format(), _paired_verdict(d),
                     _verdict(mean_ci(me.values()), mean_ci(them.values())), per_seed])
    if not rows:
        return ""
    headers = [f"pair ({primary})", "seeds", "Δ paired (pt)", "paired: 95 % interval", "own intervals", "Δ per seed (pt)"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _same(a, b) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-9


def _last_round(record: dict) -> dict:
    held = (record.get("summary") or {}).get("pruningnet_heldout")
    return held[-1] if held else {}


def pruningnet_table(spec: Spec, exp, records: list[dict]) -> str:
    """MetaPruning's PruningNet check of `exp`, per seed and round: the held-out accuracy of the
    probed structures feasible at each target (mean, and min-max), against `pruningnet_until`. One
    PruningNet per seed serves every target, so the rounds are read from one record per seed.
    Empty when no record has per-target rounds (PruningNets trained without a check)."""
    per_seed = {}
    for r in sorted(records, key=lambda r: (r["seed"], r["target"])):
        held = (r.get("summary") or {}).get("pruningnet_heldout") or []
        if r["experiment"] == exp.name and "error" not in r and held and "per_target" in held[0]:
            per_seed.setdefault((r["method"], r["seed"]), held)
    if not per_seed:
        return ""
    rows = []
    for (key, seed), held in sorted(per_seed.items()):
        until = spec.methods[key].options.get("pruningnet_until")
        for r in held:
            cells = [key, str(seed), str(r["epochs"])]
            for target in exp.targets:
                acc = next((t["accuracy"] for t in r["per_target"] if _same(t["flops"], target)), [])
                cells.append(f"{statistics.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}, n={len(acc)})" if acc else "")
            reached = until is not None and r["heldout_accuracy"] >= until
            cells += [f"{r['heldout_accuracy']:.3f}", f"{'yes' if reached else 'no'} ({until})",
                      f"{r.get('seconds', 0) / 60:.1f}"]
            rows.append(cells)
    headers = ["method", "seed", "epochs", *(f"held-out at {t:g}: mean (min-max)" for t in exp.targets),
               "check (lowest mean)", "reached", "training min"]
    title = (f"#### {exp.name}: the PruningNet's held-out accuracy on sampled feasible structures, per round "
             "(the check: every target's mean >= `pruningnet_until`)")
    return title + "\n\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def experiment_tables(spec: Spec, records: list[dict]) -> str:
    """One markdown table per (experiment, target)."""
    by = defaultdict(list)
    for r in records:
        by[(r["experiment"], r["target"])].append(r)
    parts = []
    for exp in spec.experiments:
        for target in exp.targets:
            rows_in = [r for r in by.get((exp.name, target), []) if r["method"] in exp.methods]
            if not rows_in:
                continue
            ok = [r for r in rows_in if "error" not in r]
            primary = _primary(exp.after)
            acc = defaultdict(lambda: defaultdict(dict))  # method -> evaluation -> seed -> accuracy
            for r in ok:
                for k, v in r["accuracy"].items():
                    acc[r["method"]][k][r["seed"]] = v
            base = {r["seed"]: r["baseline_accuracy"] for r in ok}
            headers = ["method", "MACs ratio", "within 1 %", "params ratio", *(_AFTER_TITLE[a] for a in exp.after),
                       f"Δ vs baseline ({primary})", "Δ vs uniform", "vs uniform", "Δ vs l1", "vs l1", "seeds",
                       "min / run", "notes"]
            rows = [["baseline (unpruned)", "1.000", "", "1.000", *([""] * len(exp.after)),
                     "", "", "", "", "", str(len(base)), "", mean_ci(base.values()).format() + " % test acc"]]
            for key in exp.methods:
                mine = [r for r in ok if r["method"] == key]
                if not mine:
                    continue
                ratios = [r["macs_ratio"] for r in mine]
                cells = [key, f"{sum(ratios) / len(ratios):.4f}",
                         "yes" if all(r["budget_ok"] for r in mine) else
                         f"no ({min(ratios) / target - 1:+.1%} .. {max(ratios) / target - 1:+.1%})",
                         f"{sum(r['params_ratio'] for r in mine) / len(mine):.3f}"]
                cells += [mean_ci(acc[key][a].values()).format() for a in exp.after]
                me = acc[key][primary]
                cells.append(paired(me, base).format())
                for other in ("uniform", "l1"):
                    if other == key or other not in acc:
                        cells += ["", ""]
                        continue
                    cells += [paired(me, acc[other][primary]).format(),
                              _verdict(mean_ci(me.values()), mean_ci(acc[other][primary].values()))]
                cells += [str(len(me)), f"{sum(r['wall_seconds'] for r in mine) / len(mine) / 60:.1f}", _note(mine)]
                rows.append(cells)
            title = (f"### {exp.name}: {exp.model} at {target:g} of the MACs "
                     f"({'full data' if exp.data == 'full' else exp.data + ' regime'})")
            parts.append(title + "\n\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
            pairs = comparison_table(exp, primary, acc)
            if pairs:
                parts.append(pairs)
            errors = [r for r in rows_in if "error" in r]
            if errors:
                parts.append("Failed runs: " + "; ".join(f"{r['method']} seed {r['seed']}: {r['error']}" for r in errors))
        check = pruningnet_table(spec, exp, [r for r in records if r["method"] in exp.methods])
        if check:
            parts.append(check)
    return "\n\n".join(parts)


def write_docs(doc: Path, body: str, header: str) -> None:
    """Replace the text between the evidence markers of `doc` (inserted after its title if absent)."""
    text = doc.read_text() if doc.exists() else "# Results on real data\n"
    block = f"{BEGIN}\n{header}\n\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _m: block, text, flags=re.S)
    else:
        lines = text.split("\n", 1)
        text = lines[0] + "\n\n" + block + "\n" + (lines[1] if len(lines) > 1 else "")
    doc.write_text(text)
