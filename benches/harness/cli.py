"""``python -m benches.harness``: the project's benchmark suite, its goals and its documents.

Run from the repository root (``benches`` is a package of the checkout, never installed)::

    python -m benches.harness                                  # the 12 models, CPU (+ CUDA if present)
    python -m benches.harness --models resnet18,resnet50 --batch 1 --flops 0.5 --doc /tmp/bench.md
    python -m benches.harness --wait-quiet 2400 --threads 2    # wait for a load average < 1 first
    python -m benches.harness --kernels                        # + benches/micro/bench_kernels.py
    python -m benches.harness --models resnet50 --merge        # re-measure one model of docs/benchmarks.json

It writes ``--doc`` (default ``<root>/docs/benchmarks.md``: only the part between its markers), the
JSON next to it and the plots into ``<doc name>-plots/``, and prints the goals. ``--root`` is the
repository whose commit the results record and whose kernel benchmarks ``--kernels`` runs (default:
the checkout this file is in).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fxprune.errors import ConfigError, FxpruneError
from fxprune.models import parse_shape

from .config import BenchConfig
from .kernels import run_kernel_benchmarks
from .machine import REPO, wait_until_quiet
from .plots import write_plots
from .report import COMMAND, command_line, goals_table, render, write_doc, write_json
from .suite import merge_results, run_suite


def _csv(text: str, convert, what: str) -> tuple:
    try:
        return tuple(convert(t.strip()) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r}: {exc}") from exc


def _round_to(text: str):
    return None if text.lower() in ("none", "0", "off") else int(text)


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise ValueError("use on and/or off")
    return text.lower() == "on"


def config_from_args(args) -> BenchConfig:
    shapes = {}
    for item in args.input_shape or []:
        name, sep, shape = item.partition("=")
        if not sep:
            raise ConfigError(f"--input-shape {item!r} must look like NAME=1,3,224,224")
        shapes[name] = parse_shape(shape)
    return BenchConfig(
        models=list(_csv(args.models, str, "--models")) if args.models else BenchConfig().models,
        flops=_csv(args.flops, float, "--flops"), round_to=_csv(args.round_to, _round_to, "--round-to"),
        batches=_csv(args.batch, int, "--batch"), threads=args.threads,
        devices=_csv(args.devices, str, "--devices"), dtypes=_csv(args.dtypes or "", str, "--dtypes"),
        torch_compile=_csv(args.torch_compile or "", _on_off, "--torch-compile"),
        compile_repeats=args.compile_repeats, method_repeats=args.method_repeats, latency_repeats=args.repeats,
        heavy_latency_repeats=args.heavy_repeats, cuda_latency_repeats=args.cuda_repeats, warmup=args.warmup,
        compare=not args.no_compare, kernels=args.kernels, plots=not args.no_plots, input_shapes=shapes,
        head_to_head_models=_csv(args.head_to_head, str, "--head-to-head") if args.head_to_head else (),
        head_to_head_pairs=args.pairs,
    ).validate()


def run(args, argv: list[str]) -> int:
    cfg = config_from_args(args)
    root = Path(args.root).resolve()
    if not root.is_dir():
        raise ConfigError(f"--root {args.root} is not a directory")
    doc = Path(args.doc) if args.doc else root / "docs" / "benchmarks.md"
    json_path, plots_dir = doc.with_suffix(".json"), doc.parent / f"{doc.stem}-plots"
    wait = wait_until_quiet(args.wait_quiet, args.load_threshold) if args.wait_quiet > 0 else None
    partial = json_path.with_name(json_path.stem + ".partial.json") if args.merge else json_path
    results = run_suite(cfg, on_progress=lambda r: write_json(partial, r), root=root)
    results["command"] = command_line(argv)
    results["wait"] = wait
    results["json"] = os.path.relpath(json_path, doc.parent)
    results["kernels"] = (run_kernel_benchmarks(threads=cfg.threads, root=root) if cfg.kernels else
                          {"status": "skipped", "message": f"not requested (`{COMMAND} --kernels`)"})
    if args.merge and json_path.exists():
        results = merge_results(json.loads(json_path.read_text()), results)
    if cfg.kernels:
        print(f"kernel benchmarks: {results['kernels']['status']} {results['kernels'].get('message', '')}")
    if cfg.plots:
        paths, results["plots_message"] = write_plots(results, plots_dir)
        results["plots"] = [os.path.relpath(p, doc.parent) for p in paths]
        print(results["plots_message"])
    write_json(json_path, results)
    if partial != json_path:
        partial.unlink(missing_ok=True)
    write_doc(doc, render(results))
    print(goals_table(results))
    print(f"\nwritten: {doc}, {json_path}" + (f", {plots_dir}/" if results.get("plots") else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description="fxprune's benchmark suite: compile speed, realized "
                                "speedup and Torch-Pruning side by side, judged against the project's goals; "
                                "writes docs/benchmarks.md, .json and plots.")
    p.add_argument("--models", help="comma-separated torchvision names or specs (default: the 12 of issue 8)")
    p.add_argument("--flops", default="0.5,0.3", help="FLOPs targets (fractions kept)")
    p.add_argument("--round-to", default="none,8", help="round_to values, 'none' for no rounding")
    p.add_argument("--batch", default="1,32", help="batch sizes for the latency")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the whole run")
    p.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda is skipped where there is none)")
    p.add_argument("--dtypes", default=None, help="e.g. float32,bfloat16 (default: float32 on CPU, both on CUDA)")
    p.add_argument("--torch-compile", default=None, help="on and/or off (default: off on CPU, both on CUDA)")
    p.add_argument("--compile-repeats", type=int, default=5, help="fxprune/Torch-Pruning compile repeats")
    p.add_argument("--method-repeats", type=int, default=3, help="repeats of each data-free method pass")
    p.add_argument("--repeats", type=int, default=7, help="CPU latency repeats (median)")
    p.add_argument("--heavy-repeats", type=int, default=3, help="CPU latency repeats of inception_v3, "
                   "densenet121, convnext_tiny")
    p.add_argument("--cuda-repeats", type=int, default=30, help="CUDA latency repeats")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per model before timing")
    p.add_argument("--head-to-head", default="resnet50", help="models whose fxprune and Torch-Pruning slim "
                   "models (first FLOPs target, largest batch, CPU) are also timed pair by pair ('' for none)")
    p.add_argument("--pairs", type=int, default=9, help="pairs of the head-to-head timing")
    p.add_argument("--input-shape", action="append", help="NAME=1,3,H,W for a model (repeatable)")
    p.add_argument("--no-compare", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--kernels", action="store_true", help="also run benches/micro/bench_kernels.py when present")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--merge", action="store_true", help="keep the other models of the existing JSON: "
                   "re-measure a few models of an earlier run")
    p.add_argument("--root", default=str(REPO), help="the repository checkout (its git commit is recorded, its "
                   "kernel benchmarks run; default: the one holding this harness)")
    p.add_argument("--doc", default=None, help="Markdown report (default <root>/docs/benchmarks.md); the JSON "
                   "goes next to it (.json) and the plots into <name>-plots/")
    p.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many seconds for the load "
                   "average to fall below --load-threshold before starting")
    p.add_argument("--load-threshold", type=float, default=1.0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except FxpruneError as exc:
        print(f"{COMMAND}: error: {exc}", file=sys.stderr)
        return 2
