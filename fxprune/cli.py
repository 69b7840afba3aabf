"""Command line: ``fxprune inspect MODEL`` and ``fxprune compress MODEL --method l1 --flops 0.5``."""
from __future__ import annotations

import argparse
import sys
import time

from .api import METHODS, analyze, compress
from .errors import FxpruneError
from .models import build_model, default_input_shape, example_input, parse_shape


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


def cmd_compress(args) -> int:
    model, x = _model_and_input(args)
    start = time.perf_counter()
    slim = compress(model, args.method, x, args.flops, round_to=args.round_to, ignore=args.ignore or (),
                    min_channels=args.min_channels, min_ratio=args.min_ratio, verify=not args.no_verify)
    print(f"{args.model}: {args.method} at flops={args.flops} in {time.perf_counter() - start:.2f}s")
    print(slim.fxprune_report.table())
    return 0


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

    p = sub.add_parser("compress", help="prune to a FLOPs target and print the before/after table")
    common(p)
    p.add_argument("--method", default="l1", choices=METHODS)
    p.add_argument("--flops", type=float, default=0.5, help="fraction of the original FLOPs to keep")
    p.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of N")
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--min-ratio", type=float, default=0.0)
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the masked original")
    p.set_defaults(func=cmd_compress)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FxpruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
