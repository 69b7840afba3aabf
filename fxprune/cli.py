"""Command line: ``fxprune inspect MODEL``, ``fxprune compress MODEL --method l1 --flops 0.5``,
``fxprune zoo`` (many models, one process each) and ``fxprune bench MODEL`` (original vs slim latency)."""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import profile_report
from .api import DATA_FREE_METHODS, _check_options, analyze, compress
from .arguments import COMPILE_MODES, GROUPED, HEADS, LAYERNORM
from .benchmark import DTYPES as BENCH_DTYPES
from .benchmark import bench_models, render_table, write_json
from .errors import ConfigError, FxpruneError
from .export import CHECKS
from .latency import MIN_WARMUP
from .latency_model import profile_latency
from .models import build_model, default_input_shape, example_input, parse_shape
from .zoo import markdown, run_zoo, select
from .zoo.report import write_report
from .zoo.runner import ZooInterrupted, check_limits


def _model_and_input(args):
    model = build_model(args.model).eval()
    shape = parse_shape(args.input_shape) if args.input_shape else default_input_shape(args.model)
    return model, example_input(shape)


def cmd_inspect(args) -> int:
    model, x = _model_and_input(args)
    analysis = analyze(model, x, ignore=args.ignore or ())
    print(analysis.table(limit=args.limit))
    print("time: " + ", ".join(f"{k} {v:.3f}s" for k, v in analysis.timings.items()))
    return 0


def _round_to(text: str):
    """--round-to: a positive integer or 'auto' (the latency model's step edges)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--round-to {text!r}: a positive integer or 'auto'") from None


def _dtype(text: str) -> torch.dtype:
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if text not in names:
        raise argparse.ArgumentTypeError(f"--dtype {text!r}: choose from {', '.join(names)}")
    return names[text]


def _measure_on(args) -> dict:
    return {"device": args.device, "batch": args.batch, "dtype": args.dtype, "channels_last": args.channels_last,
            "compile": args.compile}


def _measure_options(p) -> None:
    p.add_argument("--device", default="cpu", help="where latency is measured: cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, default=None, help="batch size latency is measured at (default: the input's)")
    p.add_argument("--dtype", type=_dtype, default=None, help="float32, float16 or bfloat16 (default: the model's)")
    p.add_argument("--channels-last", action="store_true", help="measure with NHWC activations")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="measure the torch.compile'd model; MODE is torch.compile's (default 'default'; "
                        "'reduce-overhead' records CUDA graphs, which takes the host's kernel launches out of a GPU forward; "
                        "'cuda-graph': the eager forward captured in one CUDA graph and replayed, no compilation)")


def cmd_profile(args) -> int:
    model, x = _model_and_input(args)
    analysis = analyze(model, x, ignore=args.ignore or ())
    start = time.perf_counter()
    latency_model = profile_latency(analysis, **_measure_on(args), threads=args.threads, refresh=args.refresh)
    print(profile_report.render(latency_model, args.limit))
    print(f"profile time: {time.perf_counter() - start:.2f}s")
    if args.json:
        print(f"written: {profile_report.write_json(latency_model, args.json)}")
    if args.plot:
        print(f"written: {profile_report.plot_staircases(latency_model, args.plot)}")
    return 0


def _grouped_option(p) -> None:
    p.add_argument("--grouped", default="whole", choices=GROUPED,
                   help="grouped convs: remove whole groups (default), keep an equal count in every group, "
                        "or auto (equal where the groups are wide enough)")


def _structure_options(p) -> None:
    """--grouped, --heads and --layernorm: how coupled structures are pruned. One definition for
    `compress` and `zoo`, so that both accept the same values with the same help."""
    _grouped_option(p)
    p.add_argument("--heads", default="whole", choices=HEADS,
                   help="attention (nn.MultiheadAttention/ViT, Swin, MaxViT, MViT): remove whole heads "
                        "(default), keep the same q/k and v positions in every head (width), or auto (width "
                        "where a head is at least as wide as the number of heads); MViT's pooled attention "
                        "is narrowed only with --layernorm prune")
    p.add_argument("--layernorm", default="boundary", choices=LAYERNORM,
                   help="LayerNorm over the channel dim: keep its channels (boundary, default) or prune the "
                        "residual stream through it (prune: it then normalises over the kept channels only, "
                        "which is NOT function-preserving; verified against a reference that does the same)")


def cmd_compress(args) -> int:
    model, x = _model_and_input(args)
    start = time.perf_counter()
    slim = compress(model, args.method, x, args.flops, round_to=args.round_to, ignore=args.ignore or (),
                    min_channels=args.min_channels, min_ratio=args.min_ratio, verify=not args.no_verify,
                    latency=args.latency, latency_ms=args.latency_ms, grouped=args.grouped, heads=args.heads,
                    layernorm=args.layernorm, blocks=args.blocks, **_measure_on(args))
    print(f"{args.model}: {args.method} at flops={args.flops} in {time.perf_counter() - start:.2f}s")
    print(slim.fxprune_report.table())
    return 0


def cmd_zoo(args) -> int:
    try:
        return _zoo(args)
    except ZooInterrupted as stop:  # SIGINT or SIGTERM: the workers are dead, every finished result is kept
        print(f"fxprune: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before or after the run itself
        print("fxprune: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _zoo(args) -> int:
    check_limits(args.jobs, args.timeout, args.max_memory)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be an integer >= 1 (got {args.threads})")
    tasks = [t for item in (args.task or ["classification"]) for t in item.split(",") if t]
    entries = select(tasks, args.models, args.models_from)
    checks = [c for c in (args.checks.split(",") if args.checks else []) if c]
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ConfigError(f"unknown --checks {sorted(unknown)}: choose from {', '.join(CHECKS)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    options = {"method": args.method, "flops": args.flops, "round_to": args.round_to,
               "min_channels": args.min_channels, "min_ratio": args.min_ratio, "checks": checks,
               "latency": not args.no_latency, "threads": threads, "grouped": args.grouped,
               "heads": args.heads, "layernorm": args.layernorm}
    _check_compress_options(args)
    out = Path(args.out)
    rows = run_zoo(entries, out, options, jobs=args.jobs, timeout_s=args.timeout, max_memory_gb=args.max_memory,
                   retry_failed=args.retry_failed, progress=not args.quiet, force=args.force)
    if args.title is not None:
        header = (f"# {args.title}\n\nGenerated by `fxprune zoo {shlex.join(sys.argv[2:])}` on "
                  f"{time.strftime('%Y-%m-%d')}: {platform.machine()}, {os.cpu_count()} cores, "
                  f"torch threads per model: {threads}, torch {torch.__version__}.\n\n")
        write_report(out, [e.name for e in entries], header)
    print(markdown(rows))
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"\n{ok}/{len(rows)} converted; report: {out / 'report.md'}, {out / 'report.json'}")
    return 0


def _csv(text: str, convert, what: str) -> tuple:
    try:
        return tuple(convert(t.strip()) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r}: {exc}") from exc


# options of the project's benchmark suite, which `fxprune bench` was until it moved into the
# repository (benches/harness): (flag, takes a value)
HARNESS_OPTIONS = (("--models", True), ("--devices", True), ("--dtypes", True), ("--torch-compile", True),
                   ("--compile-repeats", True), ("--method-repeats", True), ("--heavy-repeats", True),
                   ("--cuda-repeats", True), ("--head-to-head", True), ("--pairs", True), ("--no-compare", False),
                   ("--kernels", False), ("--no-plots", False), ("--merge", False), ("--doc", True),
                   ("--wait-quiet", True), ("--load-threshold", True))
HARNESS = "`python -m benches.harness` (run from the root of a fxprune repository checkout)"


def _harness_options_used(args) -> list[str]:
    used = [flag for flag, _ in HARNESS_OPTIONS if getattr(args, "harness_" + flag[2:].replace("-", "_")) is not None]
    if args.input_shape and "=" in args.input_shape:  # the suite's NAME=1,3,H,W
        used.append("--input-shape NAME=...")
    return used


def cmd_bench(args) -> int:
    used = _harness_options_used(args)
    if used:
        print(f"fxprune bench: {', '.join(used)}: options of the project's benchmark suite (goals, docs/benchmarks.md, "
              f"Torch-Pruning), now {HARNESS}; `fxprune bench MODEL ...` times your own models", file=sys.stderr)
        return 2
    if not args.models:
        print("fxprune bench: no MODEL given: `fxprune bench torchvision:resnet50 --batch 1,32` times a model before "
              f"and after compression; the project's benchmark suite (docs/benchmarks.md) is {HARNESS}",
              file=sys.stderr)
        return 2
    round_to = None if args.round_to is None or args.round_to.lower() in ("none", "off") else args.round_to
    try:
        flops = float(args.flops)
        round_to = None if round_to is None else round_to if round_to == "auto" else int(round_to)
    except ValueError as exc:
        raise ConfigError(f"--flops {args.flops!r} / --round-to {args.round_to!r}: one number each ({exc})") from exc
    results = bench_models(
        args.models, method=args.method, flops=flops, round_to=round_to, batches=_csv(args.batch, int, "--batch"),
        threads=args.threads, device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
        input_shape=parse_shape(args.input_shape) if args.input_shape else None, verify=not args.no_verify,
        log=lambda line: print(line, file=sys.stderr), latency=args.latency, channels_last=args.channels_last,
        blocks=args.blocks)
    results["command"] = "fxprune bench " + shlex.join(args.argv)
    print(render_table(results))
    if args.json:
        write_json(args.json, results)
        print(f"\nwritten: {args.json}")
    return 1 if any("error" in m for m in results["models"]) else 0


def _check_compress_options(args) -> None:
    _check_options(args.method, args.flops, args.round_to, args.min_channels, args.min_ratio)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description="Structured pruning compiler for PyTorch CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("model", help="torchvision:NAME or package.module:factory (built with weights=None)")
        p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's)")
        p.add_argument("--ignore", action="append", help="module name or glob whose channels stay (repeatable)")

    p = sub.add_parser("inspect", help="channel groups, boundaries with reasons, MACs/params")
    common(p)
    p.add_argument("--limit", type=int, default=None, help="show at most this many groups")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("profile", help="measure the model's latency model on a device (per-layer time vs kept "
                       "channels, step edges, end-to-end fit); cached")
    common(p)
    _measure_options(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads while profiling (default: torch's)")
    p.add_argument("--refresh", action="store_true", help="measure again even when the cache has this profile")
    p.add_argument("--limit", type=int, default=20, help="show the N slowest layers (0: all)")
    p.add_argument("--json", help="write the latency model (every layer's grid and times) to this file")
    p.add_argument("--plot", help="draw each layer's staircase into this PNG (needs matplotlib)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("compress", help="prune to a FLOPs target and print the before/after table")
    common(p)
    p.add_argument("--method", default="l1", choices=DATA_FREE_METHODS,
                   help="data-free methods; gate_decorator needs training data: use the Python API")
    p.add_argument("--flops", type=float, default=0.5, help="fraction of the original FLOPs to keep")
    p.add_argument("--latency", type=float, default=None,
                   help="fraction of the original's measured latency to keep (pass --flops 1 for latency only)")
    p.add_argument("--latency-ms", type=float, default=None, help="latency limit in milliseconds instead")
    p.add_argument("--blocks", action="store_true",
                   help="with a latency target, also remove whole residual blocks where that saves more time "
                        "per importance lost than narrowing channels (l1, l2, bn_scale, random)")
    p.add_argument("--round-to", type=_round_to, default=None,
                   help="keep channel counts multiples of N, or 'auto': on the latency model's step edges")
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--min-ratio", type=float, default=0.0)
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the masked original")
    _structure_options(p)
    _measure_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("zoo", help="convert many models, each in its own process; resumable")
    p.add_argument("--task", action="append", help="classification, segmentation, detection, video, "
                   "optical_flow (repeatable or comma-separated; default classification)")
    p.add_argument("--models", help="comma-separated name globs, e.g. 'resnet*,mobilenet*'")
    p.add_argument("--models-from", help="your own models: file.py or package.module holding MODELS = "
                   "{name: builder or (builder, input_shape)} (or SOURCE:ATTR)")
    p.add_argument("--method", default="l1", choices=DATA_FREE_METHODS,
                   help="data-free methods; gate_decorator needs training data: use the Python API")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--min-ratio", type=float, default=0.0)
    _structure_options(p)
    p.add_argument("--out", default="zoo-out", help="output directory (artifacts, report.json, report.md)")
    p.add_argument("--jobs", type=int, default=1, help="models converted at once (>= 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per model (default: cores / jobs)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per model before it is killed")
    p.add_argument("--max-memory", type=float, default=None, help="GiB of resident memory per model")
    p.add_argument("--checks", default="export,compile,onnx", help="deployment checks: export,compile,onnx")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--retry-failed", action="store_true", help="redo models whose last run failed")
    p.add_argument("--force", action="store_true", help="discard the results in --out of a run with other "
                   "options (method, flops, ...) and redo every model; without it such a rerun is refused")
    p.add_argument("--title", default=None, help="write report.md with this title and the machine it ran on")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("bench", help="compress models and time them against the originals, side by side "
                       "(the project's suite: python -m benches.harness)")
    p.add_argument("models", nargs="*", metavar="MODEL", help="torchvision:NAME or package.module:factory")
    p.add_argument("--method", default="l1", choices=DATA_FREE_METHODS)
    p.add_argument("--flops", default="0.5", help="fraction of the original FLOPs to keep")
    p.add_argument("--round-to", default=None, help="keep channel counts multiples of N, or 'auto' (latency steps)")
    p.add_argument("--latency", type=float, default=None,
                   help="a latency target (fraction of the original's, measured at the first --batch) instead of "
                   "--flops alone (pass --flops 1 for latency only)")
    p.add_argument("--blocks", action="store_true",
                   help="with --latency, whole residual blocks may go too (l1, l2, bn_scale, random)")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations (for targets and timing)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(BENCH_DTYPES))
    p.add_argument("--repeats", type=int, default=7, help="timed calls per model and batch (median)")
    p.add_argument("--warmup", type=int, default=MIN_WARMUP, help=f"warm-up calls per model (at least {MIN_WARMUP})")
    p.add_argument("--input-shape", help="1,C,H,W (default: the model's; the batch comes from --batch)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the masked original")
    p.add_argument("--json", help="write every number (latency quartiles, stability) to this file")
    for flag, takes_value in HARNESS_OPTIONS:  # accepted only to point to python -m benches.harness
        dest = "harness_" + flag[2:].replace("-", "_")
        if takes_value:
            p.add_argument(flag, dest=dest, default=None, help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])
    try:
        return args.func(args)
    except FxpruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
