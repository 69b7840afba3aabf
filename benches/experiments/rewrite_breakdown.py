"""resnet50 at half the FLOPs, compile stage by stage and the rewrite step by step (the "now" numbers
of docs/compile-speed.md).

Run: ``python benches/experiments/rewrite_breakdown.py [--model torchvision:resnet50] [--repeats 10]``
(about 30 s). Every stage is timed by calling the library's public pieces directly, as
`fxprune.compress` chains them (nothing is patched):

1. stages, median of `--repeats` runs: `fxprune.analyze` (its own trace / shapes / analysis
   timings), the method (`fxprune.methods.get_method("l1").run(MethodContext(...))`), the rewrite
   (`fxprune.passes.rewrite.apply_plan`) and the verification (`fxprune.passes.mask.masked_reference`
   + `fxprune.verify.verify`);
2. the rewrite's own steps, median of `--repeats` back-to-back rewrites of one plan (2 more first,
   not counted): the plan resolved against the analysis, the copy of module tree and graph, slicing
   the weights, the op handlers, building the GraphModule. The steps are the pieces `apply_plan`
   is made of, called in its order; the script checks that they give the same model as `apply_plan`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.fx as fx

import fxprune
from fxprune.constraints import Constraints
from fxprune.methods import MethodContext, get_method, make_options
from fxprune.models import build_model, default_input_shape, example_input
from fxprune.passes.fold import fold_channel_scales
from fxprune.passes.mask import masked_reference
from fxprune.passes.module_copy import copy_parts
from fxprune.passes.ops import handler_for
from fxprune.passes.plan import insert_input_scales, resolve
from fxprune.passes.rewrite import RewriteContext, _remove_structures, _slice_members, apply_plan
from fxprune.verify import verify

WARMUP = 2


def run_method(model, analysis, flops: float, name: str = "l1"):
    method = get_method(name)
    context = MethodContext(analysis, Constraints(flops=flops), make_options(method, None, 0), original=model)
    return method.run(context).plan


def stages(model, x, flops: float, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for _ in range(repeats + 1):  # the first run is a warm-up
        t0 = time.perf_counter()
        analysis = fxprune.analyze(model, x)
        t1 = time.perf_counter()
        plan = run_method(model, analysis, flops)
        t2 = time.perf_counter()
        slim = apply_plan(analysis.channels, plan)
        t3 = time.perf_counter()
        verify(masked_reference(analysis.channels, plan), slim, analysis.inputs)
        t4 = time.perf_counter()
        run = {**{k: analysis.timings[k] for k in ("trace", "shapes", "analysis")}, "analyze (all)": t1 - t0,
               "method (l1)": t2 - t1, "rewrite (apply_plan)": t3 - t2, "verify": t4 - t3}
        for k, v in run.items():
            times.setdefault(k, []).append(v)
    return {k: v[1:] for k, v in times.items()}


def rewrite_steps(channels, plan, repeats: int) -> tuple[dict[str, list[float]], fx.GraphModule]:
    steps: dict[str, list[float]] = {}
    for _ in range(repeats + WARMUP):
        t = time.perf_counter()

        def tick(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            steps.setdefault(name, []).append(now - t)
            t = now

        resolved = resolve(channels, plan)
        tick("plan resolved (kept positions)")
        root, graph = copy_parts(channels.gm, resolved.kept_positions)
        tick("copy of module tree and graph")
        _remove_structures(graph, resolved.plan)
        _slice_members(root, graph, resolved.kept_positions)
        tick("slicing the weights")
        rctx = RewriteContext(channels, root, resolved.keep_roots)
        for node in list(graph.nodes):
            handler = handler_for(node, rctx) if node.op.startswith("call") else None
            if handler is not None:
                handler.rewrite(rctx, node)
        insert_input_scales(graph, resolved.plan.scale_inputs)
        graph.lint()
        tick("handlers")
        slim = fx.GraphModule(root, graph, type(channels.gm).__name__)
        if resolved.plan.fold_scales:
            fold_channel_scales(slim, resolved.plan.fold_scales)
        tick("GraphModule (code generation)")
    return {k: v[WARMUP:] for k, v in steps.items()}, slim


def same_model(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.code == b.code and list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def table(times: dict[str, list[float]], total: str | None = None) -> str:
    lines = ["| step | ms |", "|---|---:|"]
    lines += [f"| {name} | {1e3 * statistics.median(v):.1f} |" for name, v in times.items()]
    if total:
        lines.append(f"| {total} | {1e3 * sum(statistics.median(v) for v in times.values()):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model).eval()
    x = example_input(default_input_shape(args.model))
    print(f"## {args.model} at {args.flops:g} of the FLOPs, {args.threads} threads: stages (median of "
          f"{args.repeats})\n\n" + table(stages(model, x, args.flops, args.repeats)))
    analysis = fxprune.analyze(model, x)
    plan = run_method(model, analysis, args.flops)
    steps, slim = rewrite_steps(analysis.channels, plan, args.repeats)
    if not same_model(slim, apply_plan(analysis.channels, plan)):
        raise SystemExit("the steps no longer reproduce fxprune.passes.rewrite.apply_plan: update rewrite_steps")
    print(f"\n## The rewrite step by step (median of {args.repeats} back-to-back rewrites)\n\n"
          + table(steps, total="total"))


if __name__ == "__main__":
    main()
