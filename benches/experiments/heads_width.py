"""Attention heads pruned whole or narrowed (issue 17): `heads="whole" | "width" | "auto"` on the
torchvision attention models at half the MACs, and how much of each cut the head groups made.

Run from the repository root (a script, not a test)::

    python -m benches.experiments.heads_width                      # every model of MODELS, 224x224
    python -m benches.experiments.heads_width --models swin_t --size 64

Per model (built as the zoo builds it: `benches.experiments.tp_structured.build`, ``weights=None``,
seed 0, eval, degenerate weights randomised) and per `heads` value: ``compress(model, "l1", x,
flops=0.5, heads=...)`` in this process, one thread; MACs by FlopCounterMode before and after
(`benches.harness.metrics.count_macs`), params, the verification's max relative error against the
masked original, seconds, and the share of the plan's MACs drop made by the attention-head groups
(`tp_structured.structured_cut`, kind "heads": whole heads, or q/k and v positions). MViT keeps whole
heads under every value (README, "MViT attention heads"), so it is left out. Results: ``--json``
(default docs/heads_width.json) and a Markdown table, ``--md`` (default docs/heads_width.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MODELS = ["vit_b_32", "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t", "swin_s", "swin_v2_s", "swin_b", "swin_v2_b",
          "vit_l_16"]
HEADS = ("whole", "width", "auto")
TARGET = 0.5


def measure(name: str, heads: str, size: int | None) -> dict:
    """One model, one `heads` value (module docstring)."""
    import fxprune
    from benches.experiments.tp_structured import build, structured_cut
    from benches.harness.metrics import count_macs, count_params

    model, inputs, shape = build(name, size)
    macs, params = count_macs(model, inputs), count_params(model)
    t0 = time.perf_counter()
    slim = fxprune.compress(model, "l1", inputs, flops=TARGET, heads=heads)
    seconds = time.perf_counter() - t0
    cut = structured_cut(model, inputs, slim)
    head_cut = cut["kinds"].get("heads", {"groups_pruned": 0, "macs_removed": 0.0})
    return {"model": name, "heads": heads, "input": list(shape), "macs_fraction": count_macs(slim, inputs) / macs,
            "params_fraction": count_params(slim) / params, "max_rel_error": slim.fxprune_report.max_rel_error,
            "seconds": seconds, "head_groups_pruned": head_cut["groups_pruned"],
            "share_heads_pct": 100.0 * head_cut["macs_removed"] / cut["macs_removed"] if cut["macs_removed"] else 0.0}


def markdown(rows: list[dict], setting: str) -> str:
    lines = ["# Attention heads: whole or per-head width at half the MACs", "",
             f"`python -m benches.experiments.heads_width` ({setting}). `compress(model, \"l1\", x, flops={TARGET}, "
             "heads=...)`; MACs by FlopCounterMode; error = the verification's max relative error against the "
             "masked original; heads share = the part of the MACs drop made by the head groups (whole heads, or "
             "q/k and v positions).", "",
             "| model | heads | MACs fraction | params fraction | max rel. error | head groups pruned | "
             "heads share of the cut | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['heads']} | {r['macs_fraction']:.4f} | {r['params_fraction']:.4f} | "
                     f"{r['max_rel_error']:.1e} | {r['head_groups_pruned']} | {r['share_heads_pct']:.1f} % | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    ap.add_argument("--size", type=int, default=None, help="input height and width instead of 224")
    ap.add_argument("--json", default=str(REPO / "docs" / "heads_width.json"))
    ap.add_argument("--md", default=str(REPO / "docs" / "heads_width.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        for heads in HEADS:
            rows.append(measure(name, heads, args.size))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    setting = f"torch {torch.__version__}, one thread, CPU, float32, batch 1, {args.size or 224}x{args.size or 224}"
    Path(args.json).write_text(json.dumps({"setting": setting, "rows": rows}, indent=1) + "\n")
    Path(args.md).write_text(markdown(rows, setting))
    return 0


if __name__ == "__main__":
    sys.exit(main())
