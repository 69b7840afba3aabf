"""`profile_latency`: measure a model's layers and its end-to-end time on a device, build its
`LatencyModel`, cache it on disk. `measure_model`: one model's end-to-end seconds.

What is measured, how (see the package docstring for the model):

1. Layers (`layers.find_layers`), one measurement per signature, each alone on the device with
   inputs shaped as at the profiled batch (`layers.LayerBench`). Per signature a first batch of
   points: the full layer; the input-axis grid with the output full; the output-axis grid with
   the input full; for a layer with both axes, up to three corners off the axes (smallest, ~1/3,
   ~1/2 of each grid) that fix the separable model's alpha. On the GPU the grid is every count
   that is a multiple of 8 channels (tiles); on the CPU `points` counts per axis, then up to two
   intervals per axis that hide a step (`steps.step_intervals`) are bisected (at most 3 halvings,
   each classifying the midpoint as on the low or the high side of the step, and stopping where
   it is neither: a ramp).
2. Each batch of points is timed round-robin (`latency.LatencyMeasurer`): one warm-up call each
   (it also creates oneDNN / cuDNN kernels), then as many timed repeats as fill ~20 ms per point
   on the CPU (at least `rounds`, at most 50; GPU: ~5 ms, at most 100), the median kept. Each
   call is timed by `latency.time_call_ms`: CUDA events on the GPU, perf_counter on the CPU.
   Where the models run as CUDA graphs (`compile="cuda-graph"`, "reduce-overhead",
   "max-autotune" on a GPU) a layer point is `GRAPH_LAYER_CALLS` calls captured in one CUDA
   graph, its time a replay's over that count: the kernels alone, as in the shipped model. Timed
   eagerly, a small layer takes at least what the host needs to issue it; with eager tables the
   H200 profile of 2026-11-28 predicted no plan below 0.61 of resnet50's graph-replayed time
   (docs/benchmarks.md). Graph-timed tables have not been measured on a GPU yet.
3. The fit: the full model and uniform slims keeping ~0.75, ~0.5, ~0.3 of every prunable group
   (the core rewrite), timed end to end round-robin (`rounds` repeats after a warm-up); offset
   and scale by least squares of measured on predicted layer sums (fewer than 3 distinct points,
   or a scale <= 0: scale 1 and the median difference). `original_s` is the full model's median.
   With `compile=True` (or a mode: `compile="reduce-overhead"` records CUDA graphs) these
   models are `torch.compile`d (and called before timing, once, three times where CUDA graphs
   are recorded, so neither compilation nor recording is timed; `compile="cuda-graph"`: the eager
   forward captured in one CUDA graph and replayed, `captured_call`); the layer tables are eager
   kernels (graph replays where the models are), and the fit's scale and offset carry what
   compilation changes (fusion of norms and activations into their convs).

Everything runs with `torch.inference_mode`, models in eval mode, under `latency.steady_heap`,
with `threads` CPU threads when given (restored after).

Cache: one JSON file per key (device name, torch version, dtype, batch, memory format, compile,
threads, input shapes, model layout digest, grid settings, the timer's name if one was injected)
in ``cache_dir``, else ``$FXPRUNE_CACHE/latency``, else ``~/.cache/fxprune/latency``, named by the
key's hash. A file is data only: JSON, the key compared whole, every value validated, the layers
checked against the analysis (`LatencyModel.from_json`); anything wrong and it is measured again
(and rewritten). `refresh=True` always measures.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from fxprune.passes.plan import PruningPlan
from fxprune.passes.rewrite import apply_plan

from ..arguments import CUDA_GRAPH, compile_option
from ..distributed import run_on_rank0
from ..errors import ArtifactError, ConfigError
from ..latency import LatencyMeasurer, steady_heap, time_call_ms
from ..models import shape_digest
from ..passes.inputs import ExampleInputs
from .layers import InputBuffer, LayerBench, find_layers, grid_units, specs_at
from .model import VERSION, LatencyModel
from .steps import estimate_alpha, monotone_envelope, step_intervals

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs
GRAPH_REPLAYED = (*CUDA_GRAPH_MODES, CUDA_GRAPH)  # on a GPU, layers are timed as CUDA-graph replays too
GRAPH_LAYER_CALLS = 10  # a layer's calls per captured graph: one replay / 10 is a call, events' cost spread
CPU_POINTS = 7  # grid points per axis on the CPU
POINT_TARGET_S = {"cpu": 0.02, "cuda": 0.005}  # timed repeats per point fill about this
MAX_REPEATS = {"cpu": 50, "cuda": 100}
FIT_FRACTIONS = (1.0, 0.75, 0.5, 0.3)
DIAG_FRACTIONS = (0.0, 1 / 3, 0.5)
REFINE_INTERVALS, REFINE_DEPTH = 2, 3
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "double": torch.float64}


@dataclass
class TimedCall:
    """What an injected `timer` is asked to time; it returns seconds per call.

    kind: "layer" (one layer alone) or "model" (a whole slim network, for the fit). node / op /
    signature: the layer's representative node, its op and signature (None / "model" / None for a
    model). in_channels / out_channels: channels of the layer's first tensor input and of its
    output at this point (None for a model). kept: {group: kept units} of this point (a layer:
    the groups of its axes; a model: every prunable group). `fn`: runs it once, built on first use
    (a fake timer never builds anything)."""

    kind: str
    node: str | None
    op: str
    in_channels: int | None
    out_channels: int | None
    kept: dict
    signature: str | None
    build: Callable[[], Callable[[], object]] = field(repr=False, compare=False)
    _fn: Callable[[], object] | None = field(default=None, repr=False, compare=False)

    @property
    def fn(self) -> Callable[[], object]:
        if self._fn is None:
            self._fn = self.build()
        return self._fn


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch: int | None
    channels_last: bool
    compile: str | None  # None: eager; else the torch.compile mode
    threads: int | None
    rounds: int
    points: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


def _count(value, name: str, low: int, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a device: pass 'cpu' or 'cuda' (or 'cuda:1')") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: latency profiling supports 'cpu' and 'cuda' devices")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available here (torch.cuda.is_available() is "
                              "False): profile on the machine with the GPU the model will run on, or pass device='cpu'")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
    return dev


def _dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ConfigError(f"dtype={dtype!r} is not a floating dtype: pass torch.float32, torch.float16, torch.bfloat16 "
                      "(or their names)")


def _default_dtype(model: nn.Module, inputs: ExampleInputs) -> torch.dtype:
    for t in [*model.parameters(), *inputs.tensors()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def settings_of(*, device, dtype, batch, channels_last, compile, threads, rounds, points,
                default_dtype: torch.dtype) -> Settings:
    """The options checked (ConfigError naming the bad one) and normalised."""
    dev, mode = _device(device), compile_option(compile)
    if mode == CUDA_GRAPH and dev.type != "cuda":
        raise ConfigError(f"compile={CUDA_GRAPH!r} captures a CUDA graph and needs device='cuda' (got {device!r}): "
                          "pass device='cuda', or compile=True / False on the CPU")
    return Settings(dev, _dtype(dtype, default_dtype), _count(batch, "batch", 1),
                    _flag(channels_last, "channels_last"), mode,
                    _count(threads, "threads", 1), _count(rounds, "rounds", 1, allow_none=False),
                    _count(points, "points", 2, allow_none=False))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def layout_digest(channels) -> str:
    """sha256 of the traced graph's code, its tensors' names / shapes / dtypes and its channel groups."""
    text = channels.gm.code + shape_digest(channels.gm) + repr(
        [(g.index, g.n_units, g.unit_channels, g.prunable) for g in channels.groups])
    return hashlib.sha256(text.encode()).hexdigest()


def batched(inputs: ExampleInputs, batch: int | None) -> ExampleInputs:
    """`inputs` with `batch` rows along dim 0 of every tensor (rows repeated in turn); as is for None."""
    if batch is None:
        return inputs

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0 or t.shape[0] == batch:
            return t
        return t[torch.arange(batch, device=t.device) % t.shape[0]]

    return inputs.map_tensors(one)


def on_device(inputs: ExampleInputs, s: Settings) -> ExampleInputs:
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=s.device, dtype=s.dtype if t.is_floating_point() else t.dtype)
        return t.contiguous(memory_format=torch.channels_last) if s.channels_last and t.ndim == 4 else t

    return inputs.map_tensors(one)


def make_key(channels, inputs: ExampleInputs, s: Settings, timer) -> dict:
    first = next((t for t in inputs.tensors() if t.ndim > 0), None)
    return {"format": VERSION, "device": str(s.device), "device_name": device_name(s.device),
            "torch": torch.__version__, "dtype": str(s.dtype).removeprefix("torch."),
            "batch": int(first.shape[0]) if first is not None else None, "channels_last": s.channels_last,
            "compile": s.compile, "threads": None if s.cuda else (s.threads or torch.get_num_threads()),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if s.cuda else None,
            "inputs": [[list(t.shape), str(s.dtype if t.is_floating_point() else t.dtype).removeprefix("torch.")]
                       for t in inputs.tensors()],
            "model": layout_digest(channels),
            "grid": {"points": s.points, "rounds": s.rounds,
                     **({"layer_calls_per_graph": GRAPH_LAYER_CALLS} if graph_timed(s) else {})},
            "timer": None if timer is None else getattr(timer, "__qualname__", type(timer).__qualname__)}


def cache_path(key: dict, cache_dir=None) -> Path:
    """The file of `key`: ``<dir>/<sha256 of the key>.json`` (module docstring for the dir)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("FXPRUNE_CACHE") or Path.home() / ".cache" / "fxprune") / "latency"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"{digest}.json"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON data")


UNSTABLE_TTL_S = 600.0  # an unstable profile is reused from the cache for this long only


def is_stable(model: LatencyModel) -> bool:
    """Whether the end-to-end fit measurements were stable (no re-measurement gave up)."""
    return bool(model.fit.get("stable", True))


def load_cached(path: Path, key: dict, channels, now: float | None = None) -> LatencyModel | None:
    """The cached model of `key`, or None when there is none, it is not valid (module docstring),
    or it was measured unstably more than `UNSTABLE_TTL_S` ago: a profile taken while other
    processes disturbed the machine serves the calls that follow it (a session compressing several
    times), but is measured again later rather than trusted for good."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    fit, saved_at = data.get("fit"), data.get("saved_at")
    if isinstance(fit, dict) and fit.get("stable") is False:
        now = time.time() if now is None else now
        if not isinstance(saved_at, (int, float)) or isinstance(saved_at, bool) or not 0 <= now - saved_at <= UNSTABLE_TTL_S:
            return None
    try:
        model = LatencyModel.from_json(data, channels)
    except ArtifactError:
        return None
    return model


def save_cached(path: Path, model: LatencyModel) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = {**model.to_json(), "saved_at": time.time()}
        tmp.write_text(json.dumps(data, allow_nan=False, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"fxprune: could not write the latency cache {path}: {exc}", stacklevel=3)


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepared_call(model: nn.Module, inputs: ExampleInputs, s: Settings) -> Callable[[], object]:
    """`model` (a private copy: converted in place) on the device, in eval mode, compiled if asked
    (and called once, so that timing never includes the compilation); a function running it once."""
    with torch.no_grad():
        model.eval()
        model.to(device=s.device, dtype=s.dtype)
        if s.channels_last:
            model.to(memory_format=torch.channels_last)
    if s.compile is None:
        return lambda: inputs.call(model)
    if s.compile == CUDA_GRAPH:
        return captured_call(model, inputs, s.device)
    runner = torch.compile(model, mode=None if s.compile == "default" else s.compile)
    with torch.inference_mode():  # compiles; the CUDA-graph modes record on the second and third calls
        for _ in range(3 if s.cuda and s.compile in CUDA_GRAPH_MODES else 1):
            inputs.call(runner)
    return lambda: inputs.call(runner)


def graph_timed(s: Settings) -> bool:
    """Whether this profile times CUDA-graph replays: layers and models alike (`time_layer_calls`)."""
    return s.cuda and s.compile in GRAPH_REPLAYED


def capture(fn: Callable[[], object], device: torch.device, calls: int = 1) -> Callable[[], object]:
    """`fn` called `calls` times back to back, captured once in a CUDA graph; a function replaying
    them (it returns the last call's output).

    Why: on a GPU whose host needs longer to issue a forward's kernels than the GPU needs to run
    them (docs/benchmarks.md, "Latency targets (GPU)"), a replay times the kernels alone, which is
    what a model shipped with CUDA graphs costs, without torch.compile's minutes of compilation.
    Three warm-up calls on a side stream first (cuDNN picks its algorithms, the allocator its
    blocks), as torch.cuda.graphs asks. The function holds `fn` (and through it whatever it reads)
    and the output: the graph reads and writes their memory by address, and a replay after any of
    them was freed reads whatever the allocator put there (an illegal address on the H200 once the
    slim models of the fit were dropped)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        for _ in range(calls):
            output = fn()
    held = (fn, output)

    def replay():
        graph.replay()
        return held[1]

    return replay


def captured_call(model: nn.Module, inputs: ExampleInputs, device: torch.device) -> Callable[[], object]:
    """`model`'s eager forward on `inputs` captured once in a CUDA graph (`capture`); a function
    replaying it. The inputs are the captured ones, as every timed call uses."""
    return capture(functools.partial(inputs.call, model), device)


def _graphed_layer(call: TimedCall, device: torch.device) -> Callable[[], object]:
    try:
        return capture(call.fn, device, GRAPH_LAYER_CALLS)
    except RuntimeError as exc:
        raise ConfigError(f"layer {call.node} ({call.op}) cannot be captured in a CUDA graph, which a latency "
                          f"measured on CUDA-graph replays needs ({str(exc).splitlines()[0]}): measure with "
                          "compile=False or compile=True, or add the module to ignore=") from exc


def _round_robin(fns: list, s: Settings, measurer: LatencyMeasurer) -> tuple[list[float], bool]:
    with torch.inference_mode():
        if s.cuda:
            torch.cuda.synchronize(s.device)
        out = measurer.measure({i: (lambda f=f: time_call_ms(f, s.cuda)) for i, f in enumerate(fns)})
    return [out[i].median_ms / 1e3 for i in range(len(fns))], all(m.stable for m in out.values())


def time_layer_calls(calls: list[TimedCall], s: Settings) -> tuple[list[float], bool]:
    """Median seconds per call of each layer point, timed round-robin (module docstring, 2.)."""
    with torch.no_grad():
        fns = [c.fn for c in calls]
    per_fn = 1
    if graph_timed(s):  # each fn replays GRAPH_LAYER_CALLS calls: the layer's kernels without the host
        fns, per_fn = [_graphed_layer(c, s.device) for c in calls], GRAPH_LAYER_CALLS
    kind = s.device.type
    with torch.inference_mode():
        warm = [time_call_ms(f, s.cuda) / 1e3 for f in fns]  # the warm-up call, and how long a call takes
    typical = max(statistics.median(warm), 1e-9)
    repeats = int(min(max(s.rounds, math.ceil(POINT_TARGET_S[kind] / typical)), MAX_REPEATS[kind]))
    measurer = LatencyMeasurer(repeats=repeats, warmup=0, min_warmup=0, extra_rounds=0)
    times, ok = _round_robin(fns, s, measurer)
    return [t / per_fn for t in times], ok


def time_model_calls(calls: list[TimedCall], s: Settings) -> tuple[list[float], bool]:
    """Median end-to-end seconds of each model, round-robin after a warm-up call each."""
    with torch.no_grad():
        fns = [c.fn for c in calls]
    measurer = LatencyMeasurer(repeats=max(s.rounds, 3), warmup=1, min_warmup=1, extra_rounds=1 if s.cuda else 0)
    return _round_robin(fns, s, measurer)


def _fit(sums: list[float], measured: list[float]) -> tuple[float, float]:
    s, m = np.asarray(sums, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(np.unique(np.round(s, 15))) >= 3 and np.ptp(s) > 0:
        scale, offset = np.polyfit(s, m, 1)
        if scale > 0:
            return float(offset), float(scale)
    return float(np.median(m - s)), 1.0


class _Profiler:
    def __init__(self, analysis, s: Settings, inputs: ExampleInputs, timer):
        self.channels, self.s, self.timer = analysis.channels, s, timer
        self.inputs = inputs  # at the profiled batch, on the analysis' device
        self.analysis_inputs = analysis.inputs
        self.calls = 0
        self._device_inputs = None

    def time(self, calls: list[TimedCall], kind: str) -> tuple[list[float], bool]:
        if not calls:
            return [], True
        self.calls += len(calls)
        if self.timer is not None:
            out = [float(self.timer(c)) for c in calls]
            if not all(math.isfinite(t) and t >= 0 for t in out):
                raise ConfigError(f"the timer returned {out}: seconds must be finite and >= 0")
            return out, True
        return (time_layer_calls if kind == "layer" else time_model_calls)(calls, self.s)

    # -- layers ----------------------------------------------------------------------------
    def table(self, layer, bench: LayerBench) -> dict:
        tiles = self.s.cuda
        ax = {"in": layer.in_axis, "out": layer.out_axis}
        grids = {side: grid_units(a, self.s.points, tiles) for side, a in ax.items() if a is not None}
        full = tuple(a.main_units if a is not None else None for a in ax.values())
        results: dict[tuple, float] = {}
        stable = [True]

        def kept_of(point) -> dict:
            kept = {}
            for a, k in zip(ax.values(), point):
                if a is not None:
                    kept.update(a.kept_at(k))
            return kept

        def measure(points) -> None:
            todo = [p for p in dict.fromkeys(points) if p not in results]
            calls = []
            for p in todo:
                kept = kept_of(p)
                cin, cout = bench.channels_at(kept)
                calls.append(TimedCall("layer", layer.node, layer.op, cin, cout, kept, layer.signature,
                                       functools.partial(bench.build, kept)))
            times, ok = self.time(calls, "layer")
            results.update(zip(todo, times))
            stable[0] &= ok

        def at(side: str, k: int) -> tuple:
            return (k, full[1]) if side == "in" else (full[0], k)

        first = [full] + [at(side, k) for side, (ks, _) in grids.items() for k in ks[:-1]]
        corners = []
        if len(grids) == 2:
            (ki, _), (ko, _) = grids["in"], grids["out"]
            for f in DIAG_FRACTIONS:
                ji, jo = round(f * (len(ki) - 1)), round(f * (len(ko) - 1))
                if ji < len(ki) - 1 and jo < len(ko) - 1:
                    corners.append((ki[ji], ko[jo]))
            corners = list(dict.fromkeys(corners))
        measure(first + corners)
        if not tiles:
            self.refine(grids, at, results, measure)
        curves = {}
        for side, a in ax.items():
            if a is None:
                continue
            ks = sorted(p[0 if side == "in" else 1] for p in results if p == at(side, p[0 if side == "in" else 1]))
            xs, ts = [], []
            for k in ks:
                x = a.coord(a.kept_at(k))
                if not xs or x > xs[-1]:
                    xs.append(x)
                    ts.append(results[at(side, k)])
            curves[side] = {"x": xs, "t": ts}
        alpha, diag = 0.0, []
        if len(curves) == 2:
            rows = [(results[(i, full[1])], results[(full[0], o)], results[(i, o)]) for i, o in corners]
            floor = min(float(monotone_envelope(c["t"])[0]) for c in curves.values())
            alpha = estimate_alpha(results[full], rows, floor)
            diag = [[layer.in_axis.coord(layer.in_axis.kept_at(i)), layer.out_axis.coord(layer.out_axis.kept_at(o)),
                     results[(i, o)]] for i, o in corners]
        return {"signature": layer.signature, "op": layer.op, "node": layer.node, "in": curves.get("in"),
                "out": curves.get("out"), "alpha": alpha, "diag": diag, "interp": "ceil" if tiles else "linear",
                "stable": stable[0], "calls": len(results)}

    def refine(self, grids, at, results, measure) -> None:
        """Bisect the intervals of each axis that hide a step (module docstring, 1.)."""
        active = []
        for side, (ks, q) in grids.items():
            ts = [results[at(side, k)] for k in ks]
            for j in step_intervals(ks, ts, limit=REFINE_INTERVALS):
                active.append([side, q, ks[j], ks[j + 1]])
        for _ in range(REFINE_DEPTH):
            mids = []
            for iv in active:
                side, q, lo, hi = iv
                m = max((lo + hi) // 2 // q * q, lo + q)
                if m < hi:
                    mids.append((iv, m))
            if not mids:
                return
            measure([at(iv[0], m) for iv, m in mids])
            active = []
            for iv, m in mids:
                side, q, lo, hi = iv
                t_lo, t_hi, t_m = results[at(side, lo)], results[at(side, hi)], results[at(side, m)]
                frac = (t_m - t_lo) / (t_hi - t_lo) if t_hi > t_lo else 0.5
                if frac < 0.3:
                    active.append([side, q, m, hi])
                elif frac > 0.7:
                    active.append([side, q, lo, m])

    # -- end to end ------------------------------------------------------------------------
    def build_model(self, kept: Mapping[int, int]) -> Callable[[], object]:
        groups = self.channels.groups
        plan = PruningPlan(keep={g: np.arange(k) for g, k in kept.items() if k < groups[g].n_units})
        if self._device_inputs is None:
            self._device_inputs = on_device(self.inputs, self.s)
        with torch.no_grad():
            slim = apply_plan(self.channels, plan)
        return prepared_call(slim, self._device_inputs, self.s)

    def run(self, key: dict) -> LatencyModel:
        start = time.perf_counter()
        specs = specs_at(self.channels, self.analysis_inputs, self.inputs)
        layers, skipped = find_layers(self.channels, specs)
        buffer = InputBuffer(self.s.device)
        tables, index, failed, layer_specs = [], {}, {}, []
        for layer in layers:
            if layer.signature not in index and layer.signature not in failed:
                try:
                    bench = LayerBench(self.channels, layer, specs, device=self.s.device, dtype=self.s.dtype,
                                       channels_last=self.s.channels_last, buffer=buffer)
                    table = self.table(layer, bench)
                except ConfigError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a layer that cannot run alone: the fit carries it
                    failed[layer.signature] = f"cannot run alone: {type(exc).__name__}: {str(exc)[:200]}"
                else:
                    index[layer.signature] = len(tables)
                    tables.append(table)
            if layer.signature in failed:
                skipped.append({"node": layer.node, "reason": failed[layer.signature]})
                continue
            layer_specs.append({"node": layer.node, "op": layer.op, "table": index[layer.signature],
                                "in": None if layer.in_axis is None else layer.in_axis.to_json(),
                                "out": None if layer.out_axis is None else layer.out_axis.to_json()})
        del buffer
        n_units = {g.index: g.n_units for g in self.channels.prunable_groups}
        model = LatencyModel(key, 1.0, 0.0, 1.0, tables, layer_specs, n_units)
        layer_s = time.perf_counter() - start
        plans = [{g: max(1, min(n, round(f * n))) for g, n in n_units.items()} for f in FIT_FRACTIONS]
        calls = [TimedCall("model", None, "model", None, None, kept, None, functools.partial(self.build_model, kept))
                 for kept in plans]
        measured, ok = self.time(calls, "model")
        sums = [model.layer_sum(kept) for kept in plans]
        model.offset, model.scale = _fit(sums, measured)
        model.original_s = float(measured[0])
        if not model.original_s > 0:
            raise ConfigError(f"the full model measured {model.original_s} s: a time must be > 0")
        model.fit = {"points": [{"fraction": f, "layers_s": a, "measured_s": b, "predicted_s": model.predict(k)}
                                for f, a, b, k in zip(FIT_FRACTIONS, sums, measured, plans)], "stable": ok}
        model.profile = {"seconds": time.perf_counter() - start, "layers_seconds": layer_s, "calls": self.calls,
                         "layers": len(layer_specs), "tables": len(tables), "skipped": skipped}
        return model


def profile_latency(analysis, *, device="cpu", batch=None, dtype=None, channels_last=False, compile=False,
                    cache_dir=None, refresh=False, threads=None, rounds=3, timer=None,
                    points=CPU_POINTS) -> LatencyModel:
    """The latency model of `analysis`'s model on `device` (module docstring): measured, or loaded
    from the cache when a valid entry has the same key (`refresh=True` measures anyway).

    batch: rows of the example inputs' dim 0 to profile at (default: as analysed). dtype /
    channels_last / device: how a private copy runs (the user's model and the analysis are never
    modified). threads: CPU threads while profiling. rounds: timed repeats per point at least.
    points: CPU grid points per axis. timer: `timer(TimedCall) -> seconds` instead of measuring
    (tests, simulators); its name is part of the cache key.
    """
    if not (hasattr(analysis, "channels") and hasattr(analysis, "inputs")):
        raise ConfigError(f"profile_latency needs the result of fxprune.analyze(model, x), got {type(analysis).__name__}")
    if timer is not None and not callable(timer):
        raise ConfigError(f"timer must be a function TimedCall -> seconds, got {timer!r}")
    _flag(refresh, "refresh")
    s = settings_of(device=device, dtype=dtype, batch=batch, channels_last=channels_last, compile=compile,
                    threads=threads, rounds=rounds, points=points,
                    default_dtype=_default_dtype(analysis.channels.gm, analysis.inputs))
    inputs = batched(analysis.inputs, s.batch)
    key = make_key(analysis.channels, inputs, s, timer)
    path = cache_path(key, cache_dir)
    # under torchrun, rank 0 alone reads the cache or profiles (one writer, no rank timing while
    # another one runs), and every rank gets its model: the ranks' latency decisions agree
    return run_on_rank0(functools.partial(_cached_or_profiled, analysis, s, inputs, key, path, refresh, timer))


def _cached_or_profiled(analysis, s, inputs, key: dict, path, refresh: bool, timer) -> LatencyModel:
    """The cached model of `key` (unless `refresh`), else the profiled one, then cached."""
    if not refresh:
        cached = load_cached(path, key, analysis.channels)
        if cached is not None:
            return cached
    profiler = _Profiler(analysis, s, inputs, timer)
    with _threads(s.threads), steady_heap():
        model = profiler.run(key)
    if not is_stable(model) and timer is None:
        warnings.warn(f"fxprune: the end-to-end latency measurements of this profile stayed unstable (other "
                      f"processes on the {s.device.type}?); it is cached for {UNSTABLE_TTL_S:.0f} s only. "
                      f"Profile on a quiet machine for a lasting one.", stacklevel=4)  # profile_latency's caller
    save_cached(path, model)
    return model


def measure_model(model: nn.Module, inputs: Any, *, device="cpu", dtype=None, channels_last: bool = False,
                  compile: bool = False, measurer: LatencyMeasurer | None = None) -> float:
    """End-to-end seconds per forward of a private copy of `model` on `inputs` (converted to the
    device / dtype / memory format), with the stable measurer (`latency.LatencyMeasurer`, default
    settings: warm-up, interleaved repeats, re-measured while unstable), median."""
    return measure_models([model], inputs, device=device, dtype=dtype, channels_last=channels_last, compile=compile,
                          measurer=measurer)[0]


def measure_models(models: list[nn.Module], inputs: Any, *, device="cpu", dtype=None, channels_last: bool = False,
                   compile: bool = False, measurer: LatencyMeasurer | None = None) -> list[float]:
    """`measure_model` of several models timed round-robin in one measurement (side by side: a
    ratio of two of them is what the machine does now, whatever else runs on it)."""
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ConfigError(f"models must be torch.nn.Modules, got {[type(m).__name__ for m in models]}")
    inputs = ExampleInputs.normalize(inputs)
    s = settings_of(device=device, dtype=dtype, batch=None, channels_last=channels_last, compile=compile,
                    threads=None, rounds=1, points=2, default_dtype=_default_dtype(models[0], inputs))
    x = on_device(inputs, s)
    fns = [prepared_call(copy.deepcopy(m), x, s) for m in models]
    with steady_heap():
        times, _ = _round_robin(fns, s, measurer or LatencyMeasurer())
    return times


__all__ = ["CPU_POINTS", "UNSTABLE_TTL_S", "Settings", "TimedCall", "cache_path", "is_stable", "measure_model", "measure_models",
           "profile_latency"]
