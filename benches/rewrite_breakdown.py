"""The rewrite of resnet50 at half the FLOPs, step by step (the "now" numbers of docs/compile-speed.md).

Run: ``python benches/rewrite_breakdown.py`` (about 20 s). Prints the median milliseconds of each
step of `passes.rewrite.apply_plan` over 10 rewrites of the same plan (2 not counted).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.fx as fx

import fxprune
import fxprune.api as api
import fxprune.passes.rewrite as rw
from fxprune.models import build_model, example_input
from fxprune.passes.module_copy import copy_parts
from fxprune.passes.ops import handler_for


def main() -> None:
    torch.set_num_threads(2)
    captured = {}
    apply_plan = api.apply_plan
    api.apply_plan = lambda analysis, plan: captured.update(a=analysis, p=plan) or apply_plan(analysis, plan)
    try:
        fxprune.compress(build_model("torchvision:resnet50").eval(), "l1", example_input((1, 3, 224, 224)), 0.5,
                         verify=False)
    finally:
        api.apply_plan = apply_plan
    analysis, plan = captured["a"], captured["p"]
    steps: dict[str, list[float]] = {}
    for _ in range(10):
        t = time.perf_counter()

        def tick(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            steps.setdefault(name, []).append(now - t)
            t = now

        per_tensor = rw._kept_positions(analysis, rw.plan_keep_roots(analysis, plan))
        tick("kept positions")
        root, graph = copy_parts(analysis.gm, per_tensor)
        tick("copy of module tree and graph")
        rw._remove_structures(graph, plan)
        rw._slice_members(root, graph, per_tensor)
        tick("slicing the weights")
        rctx = rw.RewriteContext(analysis, root, rw.plan_keep_roots(analysis, plan))
        for node in list(graph.nodes):
            handler = handler_for(node, rctx) if node.op.startswith("call") else None
            if handler is not None:
                handler.rewrite(rctx, node)
        graph.lint()
        tick("handlers")
        fx.GraphModule(root, graph, type(analysis.gm).__name__)
        tick("GraphModule (code generation)")
    print("| step | ms |\n|---|---:|")
    for name, times in steps.items():
        print(f"| {name} | {1e3 * statistics.median(times[2:]):.1f} |")
    print(f"| total | {1e3 * sum(statistics.median(v[2:]) for v in steps.values()):.1f} |")


if __name__ == "__main__":
    main()
