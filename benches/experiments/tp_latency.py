"""fxprune against Torch-Pruning at the same measured latency, side by side in one run.

Run from the repository root (a script, not a test)::

    python -m benches.experiments.tp_latency                          # six torchvision models, CPU, batch 8
    python -m benches.experiments.tp_latency --models resnet50 --batch 8 --threads 2
    python -m benches.experiments.tp_latency --mnist                  # ResNet-20/56 on real MNIST
    python -m benches.experiments.tp_latency --quick                  # tiny smoke run (< 2 minutes)
    python -m benches.experiments.tp_latency --table                  # print the tables of the JSON only

Why this experiment: a latency target is only worth having if the model it gives is better than
what a user gets by pruning with a FLOPs-oriented tool until it is equally fast. So the question is
"at the same measured latency, which model keeps more of the network?" -- capacity (MACs kept) on
torchvision models, and accuracy after the same fine-tune on real MNIST.

Capacity (per model; torchvision, ``weights=None``, seeded, eval, 1x3xSxS example input):

1. fxprune: ``compress(model, "l1", x, flops=1.0, latency=0.5, device=, batch=, dtype=, channels_last=)``.
2. Torch-Pruning (``benches.harness.peer``: L1 ``MagnitudeImportance``, global pruning, one shot,
   the classifier left alone): its ``pruning_ratio`` is searched (at most ``--tries`` prunings) for
   the smallest ratio whose slim model is no slower than fxprune's. Each try is judged by
   `fxprune.latency.paired_latency_ratio` (TP over fxprune, back-to-back pairs in alternating order,
   median of the per-pair ratios): on 2 cores shared with other processes two medians taken apart
   cannot tell two models of nearly the same speed apart, a ratio within each pair can.
   The search is regula falsi on log(ratio) against log(1 - pruning_ratio) (latency falls roughly
   as a power of the kept width), bracketed, each guess kept 15% of the bracket inside it.
3. The original, fxprune's and the chosen Torch-Pruning model are then measured together
   (`measure_latencies`: round-robin, medians, re-measured while unstable) and TP/fxprune once more
   pair by pair with more pairs. "Equal latency" holds when that final pair ratio is at most
   ``EQUAL_LATENCY_TOLERANCE``; otherwise the entry is flagged (``equal_latency`` False) and must not
   be read as a capacity result.
4. MACs of all three are counted by one counter (`benches.harness.metrics.count_macs`,
   FlopCounterMode), so "MACs kept" means the same for both tools.

MNIST (``--mnist``): ResNet-20 and ResNet-56 from `fxprune.nets` (option-B shortcuts, 1x28x28),
per seed: trained densely (``--mnist-train`` images, 1 epoch, cosine from 0.05), pruned once by
fxprune (l1, latency=0.5, CPU, batch ``--mnist-batch``) and once by Torch-Pruning at fxprune's
measured latency (as above), both fine-tuned with the identical schedule (1 epoch on
``--mnist-finetune`` images, same order, the dense training's cosine schedule: see `finetune`), evaluated on
the 10k MNIST test split. Mean and spread over ``--seeds``.

Everything is timed with ``torch.set_num_threads(--threads)``. Other processes may share the CPU:
only ratios measured interleaved are reported as results; the load average is recorded with each.
Results go to ``--json`` (default docs/tp_latency.json; capacity under "capacity", MNIST under
"mnist", each model/net replaced when measured again) and the Markdown tables are printed.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Subset

import fxprune
from fxprune import data as fxdata
from fxprune.errors import FxpruneError, LatencyUnreachableError
from fxprune.latency import LatencyMeasurer, measure_latencies, paired_latency_ratio, steady_heap
from fxprune.arguments import CUDA_GRAPH
from fxprune.latency_model.profile import batched, capture, on_device, settings_of
from fxprune.nets import NETS
from fxprune.passes.inputs import ExampleInputs
from fxprune.train import TrainConfig, evaluate, train

from benches.experiments.latency_goals import error_json  # one error record for both experiment files
from benches.harness.machine import cpu_model
from benches.harness.metrics import count_macs
from benches.harness.peer import classifier_layers, prune_once, torch_pruning_status

REPO = Path(__file__).resolve().parents[2]
MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "densenet121", "regnet_y_800mf")
MNIST_NETS = ("resnet20", "resnet56")
LATENCY_TARGET = 0.5
# TP's final pair-by-pair latency over fxprune's may exceed 1 by this much and still count as equal:
# the search stops at the boundary, where a re-measurement lands above 1 about half the time.
EQUAL_LATENCY_TOLERANCE = 1.05
MAX_PRUNING_RATIO = 0.95


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None



def torch_dtype(name: str | None) -> torch.dtype | None:
    """`compress` takes a torch.dtype (its MeasureOn refuses names, unlike `profile_latency`)."""
    return None if name is None else getattr(torch, name)


def setting(args) -> dict:
    """Where and how everything was measured (the table's caption)."""
    tp, tp_status = torch_pruning_status()
    dev = args.device
    name = torch.cuda.get_device_name(0) if dev == "cuda" and torch.cuda.is_available() else cpu_model()
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
                "fxprune": getattr(fxprune, "__version__", None)}
    try:
        versions["torch_pruning"] = metadata.version("torch-pruning") if tp else None
    except metadata.PackageNotFoundError:
        versions["torch_pruning"] = getattr(tp, "__version__", None)
    return {"device": dev, "device_name": name, "cores": os.cpu_count(), "threads": args.threads,
            "batch": args.batch, "dtype": args.dtype, "layout": "channels_last" if args.channels_last else "contiguous",
            "compile": getattr(args, "compile", None),
            "size": args.size, "platform": f"{platform.system()} {platform.machine()}", "versions": versions,
            "torch_pruning_status": tp_status, "latency_target": LATENCY_TARGET,
            "equal_latency_tolerance": EQUAL_LATENCY_TOLERANCE, "tries": args.tries, "pairs": args.pairs}


# ------------------------------------------------------------------------------ measuring


class GraphReplayed(torch.nn.Module):
    """`inner` run as a CUDA graph, as fxprune's latency model runs it under compile="cuda-graph":
    captured on the first call (`fxprune.latency_model.profile.capture`), replayed on the next.
    A replay computes on the tensors it captured, so every call must pass those same tensors (the
    bench passes one batch, `Bench.inputs`); other tensors are refused rather than ignored."""

    def __init__(self, inner: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner, self._device = inner, device
        self._args: tuple | None = None
        self._replay = None

    def forward(self, *args):
        if self._replay is None:
            self._args = args
            self._replay = capture(lambda: self.inner(*args), self._device)
        elif len(args) != len(self._args) or any(a is not b for a, b in zip(args, self._args)):
            raise ValueError("a CUDA-graph replay computes on the tensors it captured: call it with those")
        return self._replay()


class Bench:
    """The measuring setting of one run: models converted as fxprune's latency model converts its
    private copies (device, dtype, memory format, eval), inputs batched and converted alike; with
    compile="cuda-graph" every model is timed as CUDA-graph replays (`GraphReplayed`)."""

    def __init__(self, device: str, dtype: str | None, channels_last: bool, batch: int, pairs: int, repeats: int,
                 compile: str | None = None):
        self.s = settings_of(device=device, dtype=dtype, batch=batch, channels_last=channels_last, compile=compile,
                             threads=None, rounds=1, points=2, default_dtype=torch.float32)
        if self.s.compile not in (None, CUDA_GRAPH):
            raise ValueError(f"compile={compile!r}: this bench times eager models or CUDA-graph replays only")
        self.batch, self.pairs, self.repeats = batch, pairs, repeats

    def inputs(self, x: torch.Tensor) -> ExampleInputs:
        return on_device(batched(ExampleInputs.normalize(x), self.batch), self.s)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            m.to(device=self.s.device, dtype=self.s.dtype)
            if self.s.channels_last:
                m.to(memory_format=torch.channels_last)
        return GraphReplayed(m, self.s.device) if self.s.compile == CUDA_GRAPH else m

    def paired(self, a, b, xb: ExampleInputs, pairs: int | None = None) -> dict:
        """`paired_latency_ratio` (time of a / time of b), on a steady heap, with the load around it."""
        load = load_average()
        with steady_heap():
            r = paired_latency_ratio(a, b, xb, pairs=pairs or self.pairs)
        return {**r, "load_before": load, "load_after": load_average()}

    def side_by_side(self, models: dict, xb: ExampleInputs) -> dict:
        load = load_average()
        with steady_heap():
            ms = measure_latencies(models, xb, LatencyMeasurer(repeats=self.repeats))
        return {"latency": {k: m.to_json() for k, m in ms.items()}, "ms": {k: m.median_ms for k, m in ms.items()},
                "stable": all(m.stable for m in ms.values()), "load_before": load, "load_after": load_average()}


# ------------------------------------------------------------------------------ the two tools


def fxprune_at_latency(model, x, args, attempts: int = 2) -> tuple[torch.nn.Module | None, dict]:
    """fxprune's slim model at `LATENCY_TARGET` x the original's measured latency (flops=1.0: the
    latency target alone decides), and what its report says.

    The target is a fraction of the original's latency as measured when the model was profiled
    (the profile is cached by architecture), the slim model is measured now: on a shared CPU whose
    load moved in between, the target can look unreachable. A LatencyUnreachableError is therefore
    tried again (`attempts` in all) with a fresh profile cache, and every failure is recorded."""
    t0 = time.perf_counter()
    failures = []
    for attempt in range(attempts):
        if attempt:
            os.environ["FXPRUNE_CACHE"] = tempfile.mkdtemp(prefix="fxprune-tp-latency-retry-")
        try:
            slim = fxprune.compress(model, getattr(args, "fx_method", "l1"), x, flops=1.0, latency=LATENCY_TARGET,
                                    device=args.device,
                                    batch=args.batch, dtype=torch_dtype(args.dtype), channels_last=args.channels_last,
                                    compile=getattr(args, "compile", None), min_ratio=getattr(args, "fx_floor", 0.0),
                                    blocks=getattr(args, "fx_blocks", False))
            break
        except LatencyUnreachableError as exc:
            failures.append({**error_json(exc), "best_ms": 1e3 * exc.best_s, "target_ms": 1e3 * exc.target_s,
                             "original_ms": None if exc.original_s is None else 1e3 * exc.original_s,
                             "load": load_average()})
            log(f"  fxprune attempt {attempt + 1}: {str(exc)[:160]}")
        except FxpruneError as exc:
            return None, {"ok": False, "seconds": time.perf_counter() - t0, "error": error_json(exc),
                          "failures": failures}
    else:
        return None, {"ok": False, "seconds": time.perf_counter() - t0, "error": failures[-1], "failures": failures}
    rep = slim.fxprune_report
    d = (rep.details or {}).get("latency", {}) if isinstance(rep.details, dict) else {}
    info = {"ok": True, "seconds": time.perf_counter() - t0, "failures": failures, "report_macs_ratio": rep.macs_ratio,
            "params_ratio": rep.params_after / max(rep.params_before, 1),
            "method_measured_before_ms": 1e3 * d["measured_before_s"] if d.get("measured_before_s") else None,
            "method_measured_after_ms": 1e3 * d["measured_after_s"] if d.get("measured_after_s") else None,
            "method_target_ms": 1e3 * d["target_s"] if d.get("target_s") else None, "on": d.get("on"),
            "details": d}
    return slim, info


class LatencySearch:
    """Torch-Pruning's pruning_ratio for "no slower than fxprune's model": the smallest ratio whose
    pair-by-pair latency ratio (TP / fxprune) is <= 1, in at most `tries` prunings.

    Coordinates x = log(1 - pruning_ratio), y = log(latency ratio): latency falls roughly as a power
    of the kept width, so y is nearly linear in x and regula falsi converges in a few steps; a guess
    is kept at least 15% of the bracket's width inside it, so every try shrinks the bracket by 15% or
    more and a noisy point cannot stall the search. `lo` is the largest ratio seen too slow (ratio 0, the
    original, to begin with), `hi` the smallest seen fast enough.
    """

    def __init__(self, original_over_fx: float, first_guess: float, tries: int, min_step: float = 0.01):
        self.start = self.lo = (0.0, max(original_over_fx, 1.0 + 1e-6))  # (pruning_ratio, latency ratio)
        self.hi: tuple[float, float] | None = None
        self.first, self.tries, self.min_step = first_guess, tries, min_step
        self.points: list[tuple] = []
        self.lo_macs: float | None = None
        self.cap = MAX_PRUNING_RATIO

    @staticmethod
    def _xy(point):
        r, ratio = point
        return math.log(max(1 - r, 1e-9)), math.log(max(ratio, 1e-9))

    def add(self, r: float, ratio: float, macs: float | None = None) -> None:
        """A try: pruning_ratio `r` gave TP / fxprune latency `ratio` (and `macs` kept). Past some
        ratio Torch-Pruning's global pruning keeps *more* MACs again (seen on ResNet-20 above 0.9):
        a slower try at a larger ratio that kept more MACs than `lo` caps the ratios tried after."""
        self.points.append((r, ratio, macs))
        if ratio <= 1.0:
            if self.hi is None or r < self.hi[0]:
                self.hi = (r, ratio)
        elif r > self.lo[0]:
            if self.hi is None and macs is not None and self.lo_macs is not None and macs > self.lo_macs:
                self.cap = min(self.cap, r)
            else:  # inside a bracket a slow point always moves lo, or the next guess would repeat it
                self.lo, self.lo_macs = (r, ratio), macs

    def guess(self) -> float | None:
        r = self._guess()
        if r is not None and any(abs(r - p[0]) < 1e-4 for p in self.points):
            return None  # a ratio measured already: the search has nothing new to try
        return r

    def _guess(self) -> float | None:
        if len(self.points) >= self.tries:
            return None
        if not self.points:
            return self.first
        (x0, y0) = self._xy(self.lo)
        if self.hi is None:  # nothing fast enough yet: extrapolate ratio ~ (1 - r)^p past lo, overshooting
            if self.lo[0] >= self.cap - self.min_step:
                return None
            x_orig, y_orig = self._xy(self.start)
            p = (y0 - y_orig) / (x0 - x_orig) if x0 < x_orig - 1e-6 else 2.0
            p = min(max(p, 0.5), 4.0)
            r = 1 - math.exp(x0 - 1.15 * y0 / p)
            r = min(max(r, self.lo[0] + self.min_step), self.cap)
            return r if r < self.cap else (self.lo[0] + self.cap) / 2
        r0, r1 = self.lo[0], self.hi[0]
        if r1 - r0 <= self.min_step:
            return None
        (x1, y1) = self._xy(self.hi)
        x = x0 - y0 * (x1 - x0) / (y1 - y0) if y1 != y0 else (x0 + x1) / 2
        r = 1 - math.exp(x)
        margin = 0.15 * (r1 - r0)
        return min(max(r, r0 + margin), r1 - margin)


def tp_at_latency(model, x, bench: Bench, fx_dev, xb: ExampleInputs, original_over_fx: float,
                  fx_macs_fraction: float, macs_before: int, tries: int) -> tuple[torch.nn.Module | None, dict]:
    """Torch-Pruning's model no slower than fxprune's (`LatencySearch`); every try recorded."""
    inputs = ExampleInputs.normalize(x)
    ignored = classifier_layers(model, inputs)
    with torch.no_grad():
        reference = tuple(model(x).shape)
    # first guess: the ratio at which TP's MACs equal fxprune's (MACs ~ (1 - ratio)^2)
    search = LatencySearch(original_over_fx, 1 - math.sqrt(max(fx_macs_fraction, 1e-6)), tries)
    kept: dict[float, torch.nn.Module] = {}
    record = []
    while (r := search.guess()) is not None:
        t0 = time.perf_counter()
        try:
            pruned, seconds = prune_once(model, inputs, r, None, ignored)
            with torch.no_grad():
                shape_ok = tuple(pruned(x).shape) == reference
            frac = count_macs(pruned, inputs) / macs_before
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's own failure is the result
            record.append({"pruning_ratio": r, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            return None, {"tries": record, "error": record[-1]["error"]}
        pr = bench.paired(bench.prepare(pruned), fx_dev, xb)
        ratio = pr["ratio_median"]
        search.add(r, ratio, frac)
        kept[r] = pruned
        record.append({"pruning_ratio": r, "macs_fraction": frac, "tp_over_fx": ratio,
                       "ratio_q1": pr["ratio_q1"], "ratio_q3": pr["ratio_q3"], "stable": pr["stable"],
                       "shape_ok": shape_ok, "prune_s": seconds.get("total"),
                       "try_s": time.perf_counter() - t0, "load": pr["load_after"]})
        log(f"    TP ratio {r:.4f}: MACs {frac:.3f}, TP/fxprune latency {ratio:.3f} "
            f"({pr['ratio_q1']:.3f}-{pr['ratio_q3']:.3f})")
        for k in [k for k in kept if k != r and k != (search.hi or (None,))[0]]:
            del kept[k]  # only the best fast-enough model and the latest are held
    if search.hi is not None:
        chosen, found = search.hi[0], True
    elif record and any("tp_over_fx" in t for t in record):
        chosen, found = min((t for t in record if "tp_over_fx" in t), key=lambda t: t["tp_over_fx"])["pruning_ratio"], False
    else:
        return None, {"tries": record, "error": "no try measured"}
    model_out = kept.get(chosen)
    if model_out is None:  # the fastest try was dropped: prune it again (deterministic)
        model_out, _ = prune_once(model, inputs, chosen, None, ignored)
    return model_out, {"tries": record, "pruning_ratio": chosen, "found": found,
                       "note": None if found else f"no ratio in {len(record)} tries was as fast as fxprune's model"}


def conv_widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]


def compare(name: str, model, x, bench: Bench, args) -> dict:
    """One model: fxprune at the latency target, Torch-Pruning at fxprune's measured latency, the
    three measured side by side, MACs by one counter."""
    entry: dict = {"model": name, "input": list(x.shape), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "load_start": load_average()}
    t_start = time.perf_counter()
    inputs = ExampleInputs.normalize(x)
    macs_before = count_macs(model, inputs)
    entry["macs"] = macs_before
    fx, entry["fxprune"] = fxprune_at_latency(model, x, args)
    if fx is None:
        log(f"  fxprune: {entry['fxprune']['error']['type']}: {entry['fxprune']['error']['message'][:200]}")
        entry["seconds"] = time.perf_counter() - t_start
        return entry
    entry["fxprune"]["macs_fraction"] = count_macs(fx, inputs) / macs_before
    log(f"  fxprune: MACs {entry['fxprune']['macs_fraction']:.3f} in {entry['fxprune']['seconds']:.1f} s "
        f"(own measurement {_f(entry['fxprune']['method_measured_after_ms'], '.1f')} / "
        f"{_f(entry['fxprune']['method_measured_before_ms'], '.1f')} ms)")
    xb = bench.inputs(x)
    orig_dev, fx_dev = bench.prepare(model), bench.prepare(fx)
    start_ratio = bench.paired(orig_dev, fx_dev, xb)
    entry["original_over_fxprune_start"] = start_ratio["ratio_median"]
    t0 = time.perf_counter()
    tp_model, search = tp_at_latency(model, x, bench, fx_dev, xb, start_ratio["ratio_median"],
                                     entry["fxprune"]["macs_fraction"], macs_before, args.tries)
    entry["torch_pruning"] = {"search": search, "search_s": time.perf_counter() - t0}
    if tp_model is None:
        log(f"  Torch-Pruning: {search.get('error')}")
        entry["seconds"] = time.perf_counter() - t_start
        return entry
    tp_dev = bench.prepare(tp_model)
    entry["torch_pruning"]["macs_fraction"] = count_macs(tp_model, inputs) / macs_before
    entry["torch_pruning"]["params_ratio"] = (sum(p.numel() for p in tp_model.parameters())
                                              / sum(p.numel() for p in model.parameters()))
    sbs = bench.side_by_side({"original": orig_dev, "fxprune": fx_dev, "torch_pruning": tp_dev}, xb)
    final = bench.paired(tp_dev, fx_dev, xb, pairs=args.final_pairs)
    entry["side_by_side"] = sbs
    entry["final_pair"] = final
    ms = sbs["ms"]
    entry["fxprune"]["ms"], entry["torch_pruning"]["ms"], entry["original_ms"] = ms["fxprune"], ms["torch_pruning"], ms["original"]
    entry["fxprune"]["latency_ratio"] = ms["fxprune"] / ms["original"]
    entry["torch_pruning"]["latency_ratio"] = ms["torch_pruning"] / ms["original"]
    entry["tp_over_fx"] = final["ratio_median"]
    entry["equal_latency"] = bool(search.get("found") and final["ratio_median"] <= EQUAL_LATENCY_TOLERANCE)
    entry["capacity_ratio"] = entry["fxprune"]["macs_fraction"] / entry["torch_pruning"]["macs_fraction"]
    # where each tool put its cuts: out_channels of every conv (original, fxprune, TP), in module order
    for key, m in (("original", model), ("fxprune", fx), ("torch_pruning", tp_model)):
        (entry[key] if key != "original" else entry.setdefault("original", {}))["conv_widths"] = conv_widths(m)
    entry["seconds"] = time.perf_counter() - t_start
    log(f"  side by side: original {ms['original']:.1f} ms, fxprune {ms['fxprune']:.1f} ms "
        f"(MACs {entry['fxprune']['macs_fraction']:.3f}), Torch-Pruning {ms['torch_pruning']:.1f} ms "
        f"(MACs {entry['torch_pruning']['macs_fraction']:.3f}); TP/fxprune pair by pair {final['ratio_median']:.3f}"
        f"{'' if entry['equal_latency'] else ' (flagged: not equal latency)'}")
    entry["_models"] = (fx, tp_model)  # for the MNIST fine-tune; dropped before saving
    return entry


# ------------------------------------------------------------------------------ capacity


def build(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval(), torch.randn(1, 3, size, size)


def capacity(names, args, on_entry=None) -> dict:
    """The capacity comparison of `names` (torchvision models); entries by model name.
    `on_entry(name, entry)` is called after each model (the script saves the JSON there, so a run
    cut short keeps what it finished)."""
    bench = Bench(args.device, args.dtype, args.channels_last, args.batch, args.pairs, args.repeats,
                  getattr(args, "compile", None))
    out = {}
    for name in names:
        log(f"{name}: {args.device}, batch {args.batch}, {args.dtype}, "
            f"{'channels_last' if args.channels_last else 'contiguous'}, {args.threads} threads")
        try:
            model, x = build(name, args.size)
            entry = compare(name, model, x, bench, args)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next model
            entry = {"model": name, "error": error_json(exc)}
            log(f"  failed: {type(exc).__name__}: {exc}")
        entry.pop("_models", None)
        out[name] = entry
        if on_entry is not None:
            on_entry(name, entry)
    return out


# ------------------------------------------------------------------------------ MNIST


def _loader(ds, n: int, bs: int, seed: int) -> DataLoader:
    return DataLoader(Subset(ds, range(min(n, len(ds)))), batch_size=bs, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def parse_variant(text: str) -> tuple[str, float, bool]:
    """``METHOD[:MIN_RATIO][+blocks]`` of ``--fx-variants`` -> (method, min_ratio, blocks)."""
    text, plus, extra = text.strip().partition("+")
    if plus and extra != "blocks":
        raise ValueError(f"--fx-variants: {text}+{extra}: the only suffix is '+blocks'")
    method, _, ratio = text.partition(":")
    return method, float(ratio or 0.0), bool(plus)


def variant_name(net: str, method: str = "l1", min_ratio: float = 0.0, blocks: bool = False) -> str:
    """Where a run of one fxprune variant is stored: the net's name for the default (l1, no floor,
    no blocks), else NET@[METHOD][,min_ratio=R][,blocks], so the variants sit next to the default."""
    parts = (([] if method == "l1" else [method]) + ([f"min_ratio={min_ratio:g}"] if min_ratio else [])
             + (["blocks"] if blocks else []))
    return net if not parts else f"{net}@{','.join(parts)}"


def finetune(model, data, seed: int, epochs: int = 1) -> None:
    """The one fine-tune both slim models get: 1 epoch, SGD momentum 0.9, cosine from 0.05 (the dense
    training's schedule), same seed and so the same batch order. Why not `gate_decorator_mnist.py`'s
    gentle triangular 1e-3 -> 1e-2 without momentum: at a latency target of 0.5 both tools cut
    ResNet-20 to 5-15% of its MACs, both start near chance, and 24 such steps left both at one class
    (11.35%) in a first run -- a fine-tune that recovers nothing compares nothing."""
    for p in model.parameters():
        p.requires_grad_(True)  # Torch-Pruning's helper leaves its pruned parameters frozen
    train(model, data, TrainConfig(epochs=epochs, lr=0.05, schedule="cosine", momentum=0.9, seed=seed, progress=False))
    model.eval()


def mnist_run(nets, seeds, args, on_entry=None) -> dict:
    """Per net and seed: dense training, then for each fxprune variant (``--fx-min-ratio``: the
    default and floored selections, all from the same dense model) both prunings at equal latency,
    the same fine-tune, test accuracy. Entries by `variant_name`."""
    bench = Bench("cpu", None, False, args.mnist_batch, args.pairs, args.repeats)
    train_set, test_set = fxdata.mnist("train"), fxdata.mnist("test", limit=args.mnist_test)
    test = DataLoader(test_set, batch_size=1000)
    test_2k = DataLoader(Subset(test_set, range(min(2000, len(test_set)))), batch_size=1000)
    x = torch.randn(1, 1, 28, 28)
    out: dict = {}
    for net in nets:
        runs: dict[str, list] = {}
        for seed in seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            dense = NETS[net]()
            train(dense, _loader(train_set, args.mnist_train, 128, seed),
                  TrainConfig(epochs=args.mnist_epochs, lr=0.05, schedule="cosine", seed=seed, progress=False))
            dense.eval()
            dense_acc = evaluate(dense, test)["accuracy"]
            train_s = time.perf_counter() - t0
            log(f"{net} seed {seed}: dense test accuracy {dense_acc:.4f} ({train_s:.0f} s)")
            for method, min_ratio, blocks in args.fx_variant_list:
                t1 = time.perf_counter()
                name = variant_name(net, method, min_ratio, blocks)
                mnist_args = argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": None, "channels_last": False,
                                                   "batch": args.mnist_batch, "fx_floor": min_ratio,
                                                   "fx_method": method, "fx_blocks": blocks})
                log(f"  {name}")
                entry = compare(net, dense, x, bench, mnist_args)
                run = {"seed": seed, "dense_accuracy": dense_acc, "train_s": train_s, "fx_min_ratio": min_ratio,
                       "fx_method": method, "fx_blocks": blocks,
                       **{k: v for k, v in entry.items() if k != "_models"}}
                if "_models" in entry:
                    for tool, slim in zip(("fxprune", "torch_pruning"), entry["_models"]):
                        run[tool]["accuracy_before_ft_2k"] = evaluate(slim, test_2k)["accuracy"]  # the first 2k: time
                        finetune(slim, _loader(train_set, args.mnist_finetune, 64, 1000 + seed), seed,
                                 args.mnist_finetune_epochs)
                        run[tool]["accuracy"] = evaluate(slim, test)["accuracy"]
                    log(f"  after the same fine-tune: fxprune {run['fxprune']['accuracy']:.4f}, "
                        f"Torch-Pruning {run['torch_pruning']['accuracy']:.4f}")
                run["seconds"] = time.perf_counter() - t1
                runs.setdefault(name, []).append(run)
                out[name] = {"net": net, "fx_min_ratio": min_ratio, "fx_method": method, "fx_blocks": blocks,
                             "runs": runs[name],
                             "summary": mnist_summary(runs[name])}
                if on_entry is not None:
                    on_entry(name, out[name])
    return out


def _mean_sd(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def mnist_summary(runs: list) -> dict:
    out = {}
    for key, path in (("dense_accuracy", ("dense_accuracy",)), ("fx_accuracy", ("fxprune", "accuracy")),
                      ("tp_accuracy", ("torch_pruning", "accuracy")), ("fx_macs", ("fxprune", "macs_fraction")),
                      ("tp_macs", ("torch_pruning", "macs_fraction")), ("fx_latency", ("fxprune", "latency_ratio")),
                      ("tp_latency", ("torch_pruning", "latency_ratio")), ("tp_over_fx", ("tp_over_fx",))):
        vals = []
        for r in runs:
            v = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            vals.append(v)
        mean, sd, n = _mean_sd(vals)
        out[key] = {"mean": mean, "sd": sd, "n": n, "values": vals}
    out["equal_latency_runs"] = sum(bool(r.get("equal_latency")) for r in runs)
    both = [r for r in runs if "accuracy" in r.get("fxprune", {}) and "accuracy" in r.get("torch_pruning", {})]
    diffs = [r["fxprune"]["accuracy"] - r["torch_pruning"]["accuracy"] for r in both]
    out["fx_minus_tp_accuracy"] = dict(zip(("mean", "sd", "n"), _mean_sd(diffs)))
    # the same over the runs whose final pair check found the two models equally fast (a flagged run's
    # TP model had another latency, so its accuracy compares nothing)
    equal = [r["fxprune"]["accuracy"] - r["torch_pruning"]["accuracy"] for r in both if r.get("equal_latency")]
    out["fx_minus_tp_accuracy_equal_latency"] = dict(zip(("mean", "sd", "n"), _mean_sd(equal)))
    out["fx_better_equal_latency"] = sum(d > 0 for d in equal)
    return out


# ------------------------------------------------------------------------------ output


def _f(v, fmt: str, dash: str = "—") -> str:
    return dash if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def nearest_try(search: dict, macs: float | None) -> str:
    """The search's try whose MACs were closest to fxprune's: how much slower Torch-Pruning is at
    (nearly) the same MACs, pair by pair -- the capacity question asked the other way round, and a
    check on a row whose final equal-latency measurement was flagged."""
    tries = [t for t in search.get("tries", []) if "tp_over_fx" in t]
    if not tries or macs is None:
        return "—"
    t = min(tries, key=lambda t: abs(t["macs_fraction"] - macs))
    return f"{t['macs_fraction']:.3f}, {t['tp_over_fx']:.3f} ({t['ratio_q1']:.2f}-{t['ratio_q3']:.2f})"


def capacity_table(results: dict) -> str:
    head = ["model", "GMACs", "MACs kept: fxprune", "MACs kept: Torch-Pruning", "fxprune / TP MACs",
            "latency / original: fxprune", "latency / original: TP", "TP / fxprune latency (pairs)",
            "equal latency", "TP ratio (tries)", "TP try nearest fxprune's MACs: MACs, TP / fxprune latency (IQR)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, e in results.get("capacity", {}).items():
        fx, tp = e.get("fxprune", {}), e.get("torch_pruning", {})
        if "error" in e or not fx.get("ok"):
            why = (e.get("error") or fx.get("error") or {}).get("type", "error")
            lines.append(f"| {name} | {_f(e.get('macs', 0) / 1e9 if e.get('macs') else None, '.2f')} | {why} |"
                         + " |" * (len(head) - 3))
            continue
        fp = e.get("final_pair", {})
        search = tp.get("search", {})
        lines.append(
            f"| {name} | {e['macs'] / 1e9:.2f} | {_f(fx.get('macs_fraction'), '.3f')} | {_f(tp.get('macs_fraction'), '.3f')}"
            f" | {_f(e.get('capacity_ratio'), '.2f')}x | {_f(fx.get('latency_ratio'), '.3f')} ({_f(fx.get('ms'), '.1f')} ms)"
            f" | {_f(tp.get('latency_ratio'), '.3f')} ({_f(tp.get('ms'), '.1f')} ms)"
            f" | {_f(e.get('tp_over_fx'), '.3f')} ({_f(fp.get('ratio_q1'), '.2f')}-{_f(fp.get('ratio_q3'), '.2f')})"
            f" | {'yes' if e.get('equal_latency') else 'FLAGGED'} | {_f(search.get('pruning_ratio'), '.3f')} "
            f"({len(search.get('tries', []))}) | {nearest_try(search, fx.get('macs_fraction'))} |")
    return "\n".join(lines)


def mnist_table(results: dict) -> str:
    head = ["net", "seeds", "dense acc", "fxprune acc", "Torch-Pruning acc", "fxprune - TP (mean ± sd)",
            "fxprune - TP, equal-latency runs (fxprune better)",
            "MACs kept fxprune / TP", "latency / original fxprune / TP", "TP / fxprune latency", "equal-latency runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def ms(d, fmt=".4f"):
        return "—" if not d or d.get("mean") is None else f"{d['mean']:{fmt}} ± {d['sd']:{fmt}}"

    for net, e in results.get("mnist", {}).items():
        s = mnist_summary(e.get("runs", []))  # recomputed: a file written by an older version has fewer keys
        lines.append(
            f"| {net} | {len(e.get('runs', []))} | {ms(s.get('dense_accuracy'))} | {ms(s.get('fx_accuracy'))} | "
            f"{ms(s.get('tp_accuracy'))} | {ms(s.get('fx_minus_tp_accuracy'))} | "
            f"{ms(s.get('fx_minus_tp_accuracy_equal_latency'))} ({s.get('fx_better_equal_latency', 0)} of "
            f"{(s.get('fx_minus_tp_accuracy_equal_latency') or {}).get('n', 0)}) | "
            f"{ms(s.get('fx_macs'), '.3f')} / {ms(s.get('tp_macs'), '.3f')} | "
            f"{ms(s.get('fx_latency'), '.3f')} / {ms(s.get('tp_latency'), '.3f')} | {ms(s.get('tp_over_fx'), '.3f')} | "
            f"{s.get('equal_latency_runs', 0)}/{len(e.get('runs', []))} |")
    return "\n".join(lines)


def caption(st: dict) -> str:
    v = st.get("versions", {})
    return (f"{st.get('device')} ({st.get('device_name')}, {st.get('cores')} cores), {st.get('threads')} threads, "
            f"batch {st.get('batch')}, {st.get('dtype') or 'float32'}, {st.get('layout')}, input {st.get('size')}px"
            f"{', timed as CUDA-graph replays' if st.get('compile') == CUDA_GRAPH else ''}; "
            f"torch {v.get('torch')}, torchvision {v.get('torchvision')}, Torch-Pruning {v.get('torch_pruning')}")


def tables(results: dict) -> str:
    parts = []
    if results.get("capacity"):
        parts += [f"Capacity at equal latency: {caption(results.get('capacity_setting', {}))}", "",
                  capacity_table(results)]
        other = {k: v["setting"] for k, v in results["capacity"].items() if "@" in k and "setting" in v}
        parts += [f"- {k}: {v}" for k, v in other.items()]
    if results.get("mnist"):
        m = results.get("mnist_setting", {})
        parts += ["", f"MNIST at equal latency: {m.get('description', '')}", "", mnist_table(results)]
    return "\n".join(parts)


def merge_save(path: Path, section: str, name: str, entry: dict, top: dict) -> dict:
    """Re-read the JSON, put `entry` at results[section][name] and the `top` keys, write it back: a
    capacity run and an MNIST run may write the same file from two processes at once."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(section, {})[name] = entry
    results.update(top)
    save(path, results)
    return results


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# --quick: small enough for the test (< 60 s on 2 busy cores), large enough that every step runs
QUICK = {"models": "resnet18", "size": 64, "batch": 2, "threads": 1, "tries": 4, "pairs": 5, "final_pairs": 7,
         "repeats": 5, "mnist_nets": "resnet20", "seeds": "0", "mnist_train": 256, "mnist_finetune": 256,
         "mnist_test": 500, "mnist_batch": 16, "mnist_epochs": 1, "fx_variants": "l1,uniform:0.25"}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 (bf16) or float16 (fp16)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", choices=(CUDA_GRAPH,), default=None,
                    help="time every model as CUDA-graph replays (CUDA only; fxprune's target too)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="input height and width of the torchvision models")
    ap.add_argument("--tries", type=int, default=7, help="Torch-Pruning prunings of the latency search, at most")
    ap.add_argument("--pairs", type=int, default=11, help="pairs per latency ratio of the search")
    ap.add_argument("--final-pairs", type=int, default=21, help="pairs of the final TP / fxprune ratio")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per model in the side-by-side round")
    ap.add_argument("--mnist", action="store_true", help="the MNIST accuracy comparison instead of capacity")
    ap.add_argument("--mnist-nets", default=",".join(MNIST_NETS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--mnist-train", type=int, default=20000, help="images of the dense training")
    ap.add_argument("--mnist-epochs", type=int, default=2, help="epochs of the dense training")
    ap.add_argument("--mnist-finetune", type=int, default=10000, help="images of the fine-tune (the first of the training images)")
    ap.add_argument("--mnist-finetune-epochs", type=int, default=1, help="epochs of the fine-tune")
    ap.add_argument("--fx-method", default="l1", help="the capacity run's fxprune method (l1 or uniform; "
                                                      "store it next to l1's with --label)")
    ap.add_argument("--fx-variants", default="l1",
                    help="comma-separated fxprune variants METHOD[:MIN_RATIO][+blocks] (l1: the default importance selection; "
                         "uniform: one shared fraction; e.g. l1,l1:0.25,uniform), each compared with its own "
                         "Torch-Pruning model at its latency")
    ap.add_argument("--mnist-test", type=int, default=None, help="test images (default: all 10k)")
    ap.add_argument("--mnist-batch", type=int, default=64, help="batch the MNIST latencies are measured at")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: resnet18 at 64x64 batch 2 and ResNet-20 on 256 MNIST images, 1 seed, "
                         "1 thread (overrides the size options)")
    ap.add_argument("--json", default=None, help="results file (default docs/tp_latency.json; --quick: a temp file)")
    ap.add_argument("--cache", default=None, help="FXPRUNE_CACHE for the latency profiles (default: a new temp folder)")
    ap.add_argument("--label", default=None,
                    help="store the capacity entries as MODEL@LABEL (another setting next to the main run, e.g. 2threads)")
    ap.add_argument("--table", action="store_true", help="print the Markdown tables of the JSON and exit")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.fx_variant_list = [parse_variant(v) for v in str(args.fx_variants).split(",") if v.strip()]
    args.dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype)
    if args.json is None:
        args.json = (str(Path(tempfile.gettempdir()) / "tp_latency_quick.json") if args.quick
                     else str(REPO / "docs" / "tp_latency.json"))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    path = Path(args.json)
    if args.table:
        print(tables(json.loads(path.read_text()) if path.exists() else {}))
        return 0
    tp, status = torch_pruning_status()
    if tp is None:
        print(status, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FXPRUNE_CACHE", args.cache or tempfile.mkdtemp(prefix="fxprune-tp-latency-"))
    command = "python -m benches.experiments.tp_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    st = setting(args)
    if args.quick or not args.mnist:
        cap_setting = {**st, "command": command}
        names = [m.strip() for m in args.models.split(",") if m.strip()]

        def keep(name, entry):  # --label: a run in another setting, stored next to the main one
            suffix = f"@{args.label}" if args.label else ""
            merge_save(path, "capacity", name + suffix, {**entry, "setting": caption(cap_setting)},
                       {f"capacity_setting{suffix}": cap_setting})

        capacity(names, args, keep)
    if args.quick or args.mnist:
        nets = [n.strip() for n in args.mnist_nets.split(",") if n.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        mnist_setting = {
            **st, "command": command, "device": "cpu", "batch": args.mnist_batch, "dtype": "float32",
            "layout": "contiguous", "seeds": seeds, "train_images": args.mnist_train,
            "finetune_images": args.mnist_finetune, "test_images": args.mnist_test or 10000,
            "epochs": args.mnist_epochs, "finetune_epochs": args.mnist_finetune_epochs,
            "description": (f"CPU, {args.threads} threads, latency at batch {args.mnist_batch}, fp32; per seed: dense "
                            f"{args.mnist_epochs} epoch(s) on {args.mnist_train} train images (batch 128, cosine from 0.05, "
                            f"momentum 0.9), both slim models fine-tuned {args.mnist_finetune_epochs} epoch(s) on the first "
                            f"{args.mnist_finetune} of those (batch 64, same order, "
                            "cosine from 0.05, momentum 0.9), "
                            f"test on {args.mnist_test or 10000} test images; seeds {seeds}")}

        def keep_net(name, entry):  # runs of other seeds already in the file stay (a resumed run)
            old = (json.loads(path.read_text()) if path.exists() else {}).get("mnist", {}).get(name, {})
            mine = {r["seed"] for r in entry["runs"]}
            runs = sorted([r for r in old.get("runs", []) if r.get("seed") not in mine] + entry["runs"],
                          key=lambda r: r["seed"])
            merge_save(path, "mnist", name, {**entry, "runs": runs, "summary": mnist_summary(runs)},
                       {"mnist_setting": mnist_setting})

        mnist_run(nets, seeds, args, keep_net)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("runs", []).append({"command": command, "seconds": time.perf_counter() - start,
                                           "date": time.strftime("%Y-%m-%d %H:%M")})
    save(path, results)
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
