"""Masked conv speed: eager conv2d-then-multiply vs the fused op vs conv2d on physically sliced weights.

Run the whole sweep (markdown tables for docs/kernels.md; picks CUDA when present)::

    python benches/micro/bench_kernels.py --device cuda --batch 64 --rounds 3 --round-time 0.05 --gd
    python benches/micro/bench_kernels.py --device cpu --batch 8 --threads 2 --json cpu.json   # this 2-core CPU

or a small subset through pytest-benchmark: ``python -m pytest benches/micro/bench_kernels.py --benchmark-only``.

Goals (issue 16), on the GPU and on the CPU: the fused op within 1.15x of the sliced conv (the work of
the live channels only) at every density <= 0.75, and never slower than eager conv-then-multiply at
density 1; fp32 and bf16, forward and forward+backward. Layers: the 9 ResNet-50 / MobileNetV2
convs at 224x224 input of the issue (``--layers all`` adds 5 more). The masked channels are a random
subset (seeded); the mask is a buffer (no mask gradient, as in Gate Decorator). The op gets the
masks' live indices handed over (``out_live`` / ``in_live``), as the fused pass gives them in the
methods' graphs (``cache_live=True``; since 2026-12-08, before that it read its masks). The ``dispatch``
column is what the op's dispatcher chose for that cell (measured on its first call, which the
warm-up absorbs). Times are medians of interleaved rounds (robust against other jobs on a shared
machine). ``io`` rows (``--io``) mask the input channels at the same density too (what a chain of
masked layers sees) and compare with a conv sliced on both sides. ``--gd`` times Gate Decorator and
GAL training steps (ResNet-56 and VGG on MNIST-sized input) through the eager masks and fused.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxprune.kernels import dispatch, masked_conv2d
from fxprune.passes.compact_chain import compact_conv

# name: (cin, cout, hw, k, stride, groups)
LAYERS = {
    "r50.conv1": (3, 64, 224, 7, 2, 1),
    "r50.l1.1x1a": (64, 64, 56, 1, 1, 1),
    "r50.l1.3x3": (64, 64, 56, 3, 1, 1),
    "r50.l1.1x1b": (64, 256, 56, 1, 1, 1),
    "r50.l2.3x3": (128, 128, 28, 3, 1, 1),
    "r50.l3.3x3": (256, 256, 14, 3, 1, 1),
    "r50.l3.1x1b": (256, 1024, 14, 1, 1, 1),
    "r50.l4.3x3": (512, 512, 7, 3, 1, 1),
    "mv2.expand": (24, 144, 56, 1, 1, 1),
    "mv2.dw": (144, 144, 56, 3, 1, 144),
    "mv2.dw_s2": (144, 144, 56, 3, 2, 144),
    "mv2.expand14": (96, 576, 14, 1, 1, 1),
    "mv2.project": (576, 96, 14, 1, 1, 1),
    "mv2.last": (320, 1280, 7, 1, 1, 1),
}
# the layer list (the H100 numbers of 2026-11-27 and the goals are on these)
GOAL_LAYERS = ("r50.l1.1x1a", "r50.l1.3x3", "r50.l2.3x3", "r50.l3.3x3", "r50.l3.1x1b", "r50.l4.3x3",
               "mv2.expand", "mv2.dw", "mv2.project")
DENSITIES = (1.0, 0.75, 0.5, 0.25)
METHODS = ("dense", "eager", "fused", "sliced", "compact")


def setup(layer: str, density: float, dtype: torch.dtype, device: str, batch: int, io: bool = False, seed: int = 0):
    cin, cout, hw, k, stride, groups = LAYERS[layer]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, hw, hw, generator=gen).to(device, dtype)
    w = (torch.randn(cout, cin // groups, k, k, generator=gen) * 0.05).to(device, dtype)
    b = torch.randn(cout, generator=gen).to(device, dtype)
    live = torch.randperm(cout, generator=gen)[:max(1, round(density * cout))].sort().values
    mask = torch.zeros(cout)
    mask[live] = 1.0
    in_mask = None
    in_live = torch.arange(cin)
    if io and groups == 1 and cin > 3:
        in_live = torch.randperm(cin, generator=gen)[:max(1, round(density * cin))].sort().values
        in_mask = torch.zeros(cin)
        in_mask[in_live] = 1.0
        x[:, (in_mask == 0).to(device)] = 0  # what the masked producer hands over
        in_mask = in_mask.to(device, dtype)
    return dict(x=x, w=w, b=b, mask=mask.to(device, dtype), in_mask=in_mask, live=live.to(device),
                in_live=in_live.to(device), stride=stride, pad=k // 2, groups=groups)


def runner(method: str, s: dict, backward: bool):
    """A zero-argument callable doing one forward (and backward) of `method`."""
    x, w, b, mask, stride, pad, groups = s["x"], s["w"], s["b"], s["mask"], s["stride"], s["pad"], s["groups"]
    if method == "sliced":
        w = w[s["live"]]
        b = b[s["live"]]
        if groups > 1:  # depthwise: the slim layer also reads only its live input channels
            x, groups = x[:, s["live"]].contiguous(), len(s["live"])
        elif s["in_mask"] is not None:
            x, w = x[:, s["in_live"]].contiguous(), w[:, s["in_live"]]
        w = w.contiguous()
    x = x.detach().requires_grad_(backward)
    w = w.detach().requires_grad_(backward)
    b = b.detach().requires_grad_(backward)
    m4 = mask.reshape(1, -1, 1, 1)
    given = {"out_live": s["live"], "in_live": s["in_live"] if s["in_mask"] is not None else None}

    if method == "compact":  # in a compact chain: the input arrives compact, the output stays compact
        if groups > 1:
            return None
        in_live = s["in_live"] if s["in_mask"] is not None else None
        x = (x if in_live is None else x[:, in_live]).contiguous().detach().requires_grad_(backward)

    def forward():
        if method == "compact":
            return compact_conv(x, in_live, s["live"], w, b, stride, pad, 1, scale=mask)
        if method == "eager":
            return F.conv2d(x, w, b, stride, pad, 1, groups) * m4
        if method == "fused":  # as the fused pass calls it in the methods' graphs: live sets handed over
            return masked_conv2d(x, w, b, mask, stride, pad, 1, groups, in_mask=s["in_mask"], **given)
        return F.conv2d(x, w, b, stride, pad, 1, groups)  # dense, sliced

    if not backward:
        return forward
    grad = torch.ones_like(forward())

    def step():
        x.grad = w.grad = b.grad = None
        forward().backward(grad)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = [time.perf_counter]


def measure(fns: dict, device: str, threads: int, round_time: float, rounds: int) -> dict:
    """Seconds per call of each callable: the median over `rounds` interleaved rounds.

    Interleaving the methods puts every one of them under the same background load; the median
    ignores the rounds another job disturbed. ``--clock cpu`` times this process's CPU time instead
    of the wall clock: on a machine shared with other jobs (more runnable threads than cores) the
    wall clock mostly measures the scheduler; with one thread and a quiet machine both agree.
    """
    torch.set_num_threads(threads)
    now = _clock[0]
    number = {}
    for k, fn in fns.items():  # warm up (the dispatcher measures here), then calibrate calls per round
        fn()
        _sync(device)
        t0 = now()
        fn()
        _sync(device)
        number[k] = max(1, int(round_time / max(now() - t0, 1e-6)))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = now()
            for _ in range(number[k]):
                fn()
            _sync(device)
            times[k].append((now() - t0) / number[k])
    return {k: statistics.median(v) for k, v in times.items()}


def goal_met(r: dict) -> bool:
    """fused <= 1.15 x sliced at density <= 0.75; fused <= eager at density 1."""
    if r["density"] >= 1.0:
        return r["fused"] <= r["eager"]
    return r["fused"] <= 1.15 * r["sliced"]


def sweep(args) -> list[dict]:
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for io in ([False, True] if args.io and dtype_name == "float32" else [False]):
            for layer in args.layers.split(","):
                if io and (LAYERS[layer][5] > 1 or LAYERS[layer][0] <= 3):
                    continue
                for backward in (False, True):
                    dense_setup = setup(layer, 1.0, dtype, args.device, args.batch)
                    dense = float("inf")
                    for d in DENSITIES:
                        s = setup(layer, d, dtype, args.device, args.batch, io=io)
                        fns = {m: runner(m, dense_setup if m == "dense" else s, backward) for m in METHODS}
                        fns = {m: f for m, f in fns.items() if f is not None}  # compact: ungrouped convs only
                        t = {"compact": None} | measure(fns, args.device, args.threads, args.round_time, args.rounds)
                        fns["fused"]()
                        chosen = (dispatch.last() or ("", "?"))[1]
                        if backward:  # forward / backward implementation
                            chosen += "/" + (dispatch.last_backward() or ("", "?"))[1]
                        dense = min(dense, t.pop("dense"))
                        rows.append(dict(layer=layer, io=io, dtype=dtype_name, pass_="fwd+bwd" if backward else "fwd",
                                         density=d, dense=dense, dispatch=chosen, **t))
                    for r in rows[-len(DENSITIES):]:
                        r["dense"] = dense  # the best dense time seen for this layer
                        r["goal"] = goal_met(r)
                        print(_row(r), flush=True)
    return rows


def _row(r: dict) -> str:
    ms = 1e3
    return (f"| {r['layer']}{' io' if r['io'] else ''} | {r['dtype']} | {r['pass_']} | {r['density']:.2f} | "
            f"{r['dense'] * ms:.2f} | {r['eager'] * ms:.2f} | {r['fused'] * ms:.2f} | {r['sliced'] * ms:.2f} | "
            f"{r['fused'] / r['sliced']:.2f} | {r['fused'] / r['eager']:.2f} | {r['dispatch']} | "
            f"{'yes' if goal_met(r) else 'no'} | {_ms(r.get('compact'))} | {_ratio(r.get('compact'), r['sliced'])} |")


def _ms(t) -> str:
    return "—" if t is None else f"{t * 1e3:.2f}"


def _speedup(slow, fast) -> str:
    return "—" if slow is None or fast is None else f"{slow / fast:.2f}x"


def _ratio(a, b) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


HEADER = ("| layer | dtype | pass | density | dense conv ms | eager conv*mask ms | fused ms | sliced ms | "
          "fused/sliced | fused/eager | dispatch | goal (d<=0.75: <= 1.15 sliced; d=1: <= eager) | "
          "compact ms (in a chain) | compact/sliced |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")


def parse_rows(text: str) -> list[dict]:
    """Rows back from the sweep's markdown table (for --summarize)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) not in (12, 14) or not cells[3].replace(".", "").isdigit():
            continue
        layer, io = (cells[0][:-3], True) if cells[0].endswith(" io") else (cells[0], False)
        compact = float(cells[12]) / 1e3 if len(cells) == 14 and cells[12] != "—" else None
        rows.append(dict(layer=layer, io=io, dtype=cells[1], pass_=cells[2], density=float(cells[3]),
                         dispatch=cells[10], compact=compact,
                         **{k: float(cells[i]) / 1e3 for k, i in (("dense", 4), ("eager", 5), ("fused", 6),
                                                                    ("sliced", 7))}))
    return rows


def summarize(rows: list[dict]) -> str:
    """Per dtype / pass / io: fused / sliced per density (fused / eager at d = 1); a tick where the goal holds."""
    out = []
    keys = sorted({(r["dtype"], r["pass_"], r["io"]) for r in rows}, key=lambda k: (k[2], k[0] != "float32", k[1]))
    for dtype, pass_, io in keys:
        sel = [r for r in rows if (r["dtype"], r["pass_"], r["io"]) == (dtype, pass_, io)]
        met = sum(goal_met(r) for r in sel)
        out.append(f"\n**{dtype}, {pass_}{', input channels masked too (io)' if io else ''}**: goal met in "
                   f"{met} of {len(sel)} cells (d = 1: fused / eager; d <= 0.75: fused / sliced).\n")
        out.append("| layer | " + " | ".join(f"d = {d}" for d in DENSITIES) + " |")
        out.append("|---|" + "---:|" * len(DENSITIES))
        for layer in dict.fromkeys(r["layer"] for r in sel):
            cells = []
            for d in DENSITIES:
                r = next((r for r in sel if r["layer"] == layer and r["density"] == d), None)
                if r is None:
                    cells.append("")
                    continue
                ratio = r["fused"] / (r["eager"] if d >= 1 else r["sliced"])
                cells.append(f"{ratio:.2f}{' ✓' if goal_met(r) else ''}")
            out.append(f"| {layer} | " + " | ".join(cells) + " |")
        chain = [r["compact"] / r["sliced"] for r in sel if r.get("compact") is not None and r["density"] < 1]
        if chain:
            out.append(f"\nIn a compact chain (`compact_conv`: compact input and output; ungrouped layers): compact / "
                       f"sliced at d <= 0.75 median {statistics.median(chain):.2f}, {min(chain):.2f}-{max(chain):.2f}, "
                       f"<= 1.15 in {sum(c <= 1.15 for c in chain)} of {len(chain)} cells.")
    return "\n".join(out)


def _step(module, x, loss_fn, params):
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad()
        loss_fn(module(x)).backward()
        opt.step()

    return step


def _graphed(step, device: str):
    """`step` captured once in a CUDA graph and replayed per call: the kernels without the host.

    Why: on a GPU the eager training steps are bound by the host's launches (ResNet-56 at batch
    64: 24 ms a step on an H200, whatever the channels), so fewer channels cannot show. A graph
    replays the captured kernels with the compact shapes and live indices baked in, which is valid
    while the masks stay as they are (between two Gate Decorator Ticks, or after GAL's masks froze).
    The recipe of the CUDA graphs documentation (whole-network capture): warm-up steps on a side
    stream (optimizer state, cached live sets, cuDNN choices), the gradients set to None so the
    captured backward writes them fresh, then one captured step. None on a CPU; the error's text
    where capture fails (the fused op captures when the pass hands it its live sets, ``cache_live``;
    in soft mode, GAL's learning phase, the skipped channels' mask gradient still reads the mask)."""
    if not device.startswith("cuda"):
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return graph.replay


def gd_steps(args) -> list[dict]:
    """`gd_steps_at` for every batch of ``--gd-batch`` (comma-separated: on a GPU a small batch is
    bound by kernel launches, a large one by the GPU's work)."""
    return [row for batch in (int(b) for b in str(args.gd_batch).split(",")) for row in gd_steps_at(args, batch)]


def random_masks(analysis, gated, masked, density: float, rng) -> None:
    """Gate Decorator's masks (`gated`): a random `density` of each prunable group's units kept
    (`rng`, a numpy Generator); GAL's channel masks (`masked`): each entry 1 with probability
    `density` (a fixed seed), 0 otherwise. In place, as the methods write them."""
    from fxprune.methods.gate_decorator.method import _mask_units

    keep = {g.index: np.sort(rng.choice(g.n_units, max(1, round(density * g.n_units)), replace=False))
            for g in analysis.prunable_groups}
    _mask_units(analysis, gated, keep)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in masked.params():
            p.copy_((torch.rand(p.shape, generator=gen) < density).to(p.dtype))


def gd_steps_at(args, batch: int) -> list[dict]:
    """Gate Decorator and GAL training steps (forward, backward, SGD), eager masks vs fused, per density.

    Gate Decorator: the gated graph (BN -> * (gate * mask)), fused in hard mode. GAL: the soft-masked
    generator, a step on the MSE to a teacher output; "learning" keeps the masks trainable (fused in
    soft mode: only masks directly on a conv output fuse, see docs/kernels.md), "frozen" is the rest of
    the run after the masks froze (fused in hard mode; the masks are constant factors).
    """
    import fxprune
    from fxprune.nets import NETS
    from fxprune.passes.fuse_masked_conv import fuse_masked_convs
    from fxprune.passes.gal_masks import insert_soft_masks
    from fxprune.passes.gates import insert_gates

    rows = []
    graphs = args.device.startswith("cuda")
    print("\n| method | model | batch | density | eager masks ms/step | fused ms/step | fused/eager | speed-up "
          "| compact ms/step | compact/eager | speed-up (compact) |"
          + (" eager masks, graphed ms | fused, graphed ms | compact, graphed ms | speed-up (both graphed) | "
             "compact graphed vs eager |" if graphs else "") + "\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|---:|" if graphs else ""))
    for name, build in ((f"{key} (MNIST)", NETS[key]) for key in args.gd_models.split(",")):
        torch.manual_seed(0)
        model = build().to(args.device).train()
        x = torch.randn(batch, 1, 28, 28, device=args.device)
        y = torch.randint(0, 10, (batch,), device=args.device)
        analysis = fxprune.analyze(model, x[:2]).channels
        gated = insert_gates(analysis)
        fused = fuse_masked_convs(gated.module, mode="hard", cache_live=True)  # as the methods fuse: live sets kept
        compact = fuse_masked_convs(gated.module, mode="hard", compact=True, cache_live=True)
        masked = insert_soft_masks(analysis, ("channel",), "ones", 0)
        with torch.no_grad():
            target = model(x).detach()
        rng = np.random.default_rng(0)
        for d in DENSITIES:
            random_masks(analysis, gated, masked, d, rng)
            ce = lambda out: F.cross_entropy(out, y)  # noqa: E731
            mse = lambda out: F.mse_loss(out, target)  # noqa: E731
            cases = {("gate_decorator", "hard"): (gated.module, fused, compact, ce)}
            for phase in ("learning", "frozen"):
                for p in masked.params():
                    p.requires_grad_(phase == "learning")
                mode = "soft" if phase == "learning" else "hard"
                compact_gal = fuse_masked_convs(masked.module, mode=mode, compact=True, cache_live=True)
                cases[(f"gal ({phase})", phase)] = (masked.module,
                                                    fuse_masked_convs(masked.module, mode=mode, cache_live=True),
                                                    compact_gal, mse)
                fns, failed = {}, {}
                for (method, _), (plain, fz, cz, loss) in cases.items():
                    if any(r["method"] == method and r["model"] == name and r["density"] == d for r in rows):
                        continue
                    params = [p for p in plain.parameters() if p.requires_grad]
                    fns[(method, "eager")] = _step(plain, x, loss, params)
                    fns[(method, "fused")] = _step(fz, x, loss, params)
                    fns[(method, "compact")] = _step(cz, x, loss, params)
                    graphed = (("eager graphed", plain), ("fused graphed", fz), ("compact graphed", cz))
                    for kind, module in graphed if graphs else ():
                        # a step of its own (its own optimizer state): the capture keeps its tensors
                        replay = _graphed(_step(module, x, loss, params), args.device)
                        if callable(replay):
                            fns[(method, kind)] = replay
                        else:
                            failed[(method, kind)] = replay
                t = measure(fns, args.device, args.threads, args.round_time, args.rounds)
                for method in dict.fromkeys(m for m, _ in fns):
                    e, f_, c = t[(method, "eager")], t[(method, "fused")], t[(method, "compact")]
                    eg, fg, cg = (t.get((method, f"{k} graphed")) for k in ("eager", "fused", "compact"))
                    rows.append(dict(method=method, model=name, batch=batch, density=d, eager=e, fused=f_,
                                     compact=c, eager_graphed=eg, fused_graphed=fg, compact_graphed=cg,
                                     graph_errors={k: v for (m, k), v in failed.items() if m == method} or None))
                    line = (f"| {method} | {name} | {batch} | {d:.2f} | {e * 1e3:.1f} | {f_ * 1e3:.1f} | "
                            f"{f_ / e:.2f} | {e / f_:.2f}x | {c * 1e3:.1f} | {c / e:.2f} | {e / c:.2f}x |")
                    if graphs:
                        line += (f" {_ms(eg)} | {_ms(fg)} | {_ms(cg)} | {_speedup(eg, cg)} | {_speedup(e, cg)} |")
                    print(line, flush=True)
                    for (m, kind), err in failed.items():
                        if m == method:
                            print(f"  ({method}, {kind}: not captured: {err})", flush=True)
                cases.pop(("gate_decorator", "hard"), None)
                cases.pop(("gal (learning)", "learning"), None)
            for p in masked.params():
                p.requires_grad_(True)
    return rows


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--batch", type=int, default=64 if cuda else 8)
    ap.add_argument("--threads", type=int, default=1 if cuda else 2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layers", default=",".join(GOAL_LAYERS),
                    help="comma-separated, or 'all' (14 layers); empty: no per-layer sweep")
    ap.add_argument("--round-time", type=float, default=0.1, help="seconds per method per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--io", action="store_true", help="also mask the input channels (fp32 rows only)")
    ap.add_argument("--gd", action="store_true", help="also time Gate Decorator and GAL training steps")
    ap.add_argument("--gd-batch", default="64", help="training-step batch(es), comma-separated (e.g. 64,512)")
    ap.add_argument("--gd-models", default="resnet56,vgg_bn",
                    help="networks of fxprune.nets for --gd, comma-separated (e.g. mobilenetv2_mini)")
    ap.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                    help="wall clock, or this process's CPU time (robust on a shared CPU; use with --threads 1)")
    ap.add_argument("--json", metavar="FILE", help="write every row (and the dispatcher's choices) to FILE")
    ap.add_argument("--summarize", metavar="FILE", help="print the summary tables of a saved sweep and exit")
    args = ap.parse_args(argv)
    _clock[0] = CLOCK[args.clock]
    if args.layers == "all":
        args.layers = ",".join(LAYERS)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    head = (f"device: {dev}; torch {torch.__version__}; batch {args.batch}; threads {args.threads}; "
            f"clock {args.clock}")
    print(head + "\n")
    if args.summarize:
        print(summarize(parse_rows(Path(args.summarize).read_text())))
        return
    rows, steps = [], []
    if args.layers:
        print(HEADER)
        rows = sweep(args)
        print(summarize(rows))
    if args.gd:
        steps = gd_steps(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "torch": torch.__version__, "batch": args.batch,
                                               "threads": args.threads, "clock": args.clock, "rows": rows, "training_steps": steps,
                                               "dispatch": dispatch.decisions()}, indent=1))


# ---- pytest-benchmark entry points (a small subset; the sweep above is what docs/kernels.md shows) ----
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BATCH = 32 if _DEVICE == "cuda" else 4


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", METHODS[1:])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("layer", ["r50.l3.3x3", "mv2.dw"])
def test_masked_conv(benchmark, layer, density, method, backward):
    torch.set_num_threads(1)
    fn = runner(method, setup(layer, density, torch.float32, _DEVICE, _BATCH), backward)
    if fn is None:
        pytest.skip(f"{method} runs ungrouped convs only")
    benchmark.extra_info.update(layer=layer, density=density, method=method, device=_DEVICE, batch=_BATCH,
                                pass_="fwd+bwd" if backward else "fwd")
    if _DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)


if __name__ == "__main__":
    main()
