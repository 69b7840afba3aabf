"""Per-layer latency lookup table on the current device, for latency-constrained width search.

MetaPruning constrains latency with a table of per-layer latencies measured on the target device.
Here a "layer" is every op node of the fx graph: its latency depends only on the widths of the
genes (channel groups) in its input and output layouts, so the table maps
``(node, kept units of those genes)`` to seconds. A genome's predicted latency is
``offset + scale * (sum over its nodes)``: `offset` is the framework's per-call overhead and
`scale` what isolated timings miss (an op timed alone finds its inputs and weights in cache, inside
the network it does not); both are fitted by least squares to end-to-end measurements of a few
genomes (`calibrate`; with fewer than 3 genomes only the offset, the median difference).

Entries are measured lazily: predicting a genome with unknown entries builds its slim network
(the core rewrite), runs it once and times each node whose entry is missing with the node's real
inputs (the fastest of several rounds, each round as many calls as fill `min_time`, in `passes`
whole passes over the network). Timing uses
`time.perf_counter`, with a CUDA synchronize around each round when the inputs live on a GPU. The
number of CPU threads is whatever `torch.get_num_threads()` says when the table is measured.

Example::

    >>> table = LatencyTable(analysis.channels, encoding, analysis.inputs)
    >>> table.calibrate([encoding.full(), encoding.smallest(), encoding.uniform(0.5)])
    >>> table.predict(genome)                      # seconds, from the table
    >>> table.measure(slim)                        # seconds, end to end
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from fxprune.passes.context import Layout
from fxprune.passes.plan import PruningPlan
from fxprune.passes.rewrite import apply_plan

from .errors import ConfigError
from .passes.inputs import ExampleInputs
from .passes.shapes import _flat_placeholder_args
from .verify import eval_mode


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], cuda: bool = False, rounds: int = 5, min_time: float = 2e-4) -> float:
    """Seconds per call of `fn`: the fastest of `rounds` rounds of repeated calls (each >= `min_time`).

    The minimum, not the median: on a machine shared with other jobs, slow rounds measure the
    other jobs; the fastest round is the op's own cost, and the same statistic is used for the
    table's entries and for end-to-end measurements, so the two stay comparable."""
    fn()
    _sync(cuda)
    t = time.perf_counter()
    fn()
    _sync(cuda)
    inner = max(1, int(min_time / max(time.perf_counter() - t, 1e-7)))
    samples = []
    for _ in range(rounds):
        _sync(cuda)
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(cuda)
        samples.append((time.perf_counter() - t) / inner)
    return min(samples)


def _layout_ids(lay) -> list:
    if isinstance(lay, Layout):
        return [lay.ids]
    if isinstance(lay, (tuple, list)):
        return [ids for item in lay for ids in _layout_ids(item)]
    return []


def node_genes(channels, encoding) -> dict:
    """{op node name: genes in the layouts of its inputs and output} (the table's key dims)."""
    out = {}
    for node in channels.gm.graph.nodes:
        if not node.op.startswith("call"):
            continue
        ids = _layout_ids(channels.layouts.get(node.name))
        for arg in node.all_input_nodes:
            ids += _layout_ids(channels.layouts.get(arg.name))
        genes = encoding.genes_of_ids(np.concatenate(ids)) if ids else []
        out[node.name] = tuple(genes)
    return out


class _NodeTimer(fx.Interpreter):
    """Runs the graph once; times the wanted nodes on their actual inputs."""

    def __init__(self, gm: fx.GraphModule, wanted: set, cuda: bool, rounds: int, min_time: float):
        super().__init__(gm)
        self.wanted, self.cuda, self.rounds, self.min_time = wanted, cuda, rounds, min_time
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.name in self.wanted:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op == "call_module":
                mod = self.fetch_attr(n.target)
                fn = lambda: mod(*args, **kwargs)  # noqa: E731
            elif n.op == "call_function":
                fn = lambda: n.target(*args, **kwargs)  # noqa: E731
            else:
                fn = lambda: getattr(args[0], n.target)(*args[1:], **kwargs)  # noqa: E731
            self.times[n.name] = time_fn(fn, self.cuda, self.rounds, self.min_time)
        return result


class LatencyTable:
    """Lazily measured per-node latencies of one analysed model (see module docstring)."""

    def __init__(self, channels, encoding, inputs: ExampleInputs, *, rounds: int = 5, min_time: float = 2e-4,
                 passes: int = 2):
        if rounds < 1 or passes < 1 or min_time <= 0:
            raise ConfigError(f"latency table needs rounds >= 1, passes >= 1 and min_time > 0 (got {rounds}, "
                              f"{passes}, {min_time})")
        self.channels, self.encoding, self.inputs = channels, encoding, inputs
        self.rounds, self.min_time, self.passes = rounds, min_time, passes
        self.genes = node_genes(channels, encoding)
        self.entries: dict[tuple, float] = {}  # (node, kept counts of its genes) -> seconds
        self.offset, self.scale = 0.0, 1.0
        self.profiles = 0  # how many networks were built to fill entries
        self.cuda = any(t.is_cuda for t in inputs.tensors())

    def keys(self, genome) -> dict:
        counts = self.encoding.counts(genome)
        return {name: (name, tuple(counts[g] for g in genes)) for name, genes in self.genes.items()}

    def missing(self, genome) -> list:
        return [k for k in self.keys(genome).values() if k not in self.entries]

    def profile(self, genome) -> None:
        """Measure every entry of `genome` the table does not have yet."""
        keys = self.keys(genome)
        wanted = {name for name, k in keys.items() if k not in self.entries}
        if not wanted:
            return
        slim = apply_plan(self.channels, PruningPlan(keep=self.encoding.keep(genome)))
        best = {name: float("inf") for name in wanted}
        for _ in range(self.passes):  # whole passes apart in time: a load burst spoils one, not all
            timer = _NodeTimer(slim, wanted, self.cuda, self.rounds, self.min_time)
            with torch.inference_mode(), eval_mode(slim):
                timer.run(*_flat_placeholder_args(slim, self.inputs))
            best = {name: min(t, timer.times[name]) for name, t in best.items()}
        for name in wanted:
            self.entries[keys[name]] = best[name]
        self.profiles += 1

    def layer_sum(self, genome) -> float:
        self.profile(genome)
        return float(sum(self.entries[k] for k in self.keys(genome).values()))

    def predict(self, genome) -> float:
        """Predicted seconds of one forward pass on the example inputs."""
        return self.offset + self.scale * self.layer_sum(genome)

    def measure(self, model: torch.nn.Module, rounds: int = 30, min_time: float = 0.0) -> float:
        """End-to-end seconds of one forward pass of `model` on the example inputs (eval mode): the
        fastest of `rounds` single calls (a short call is likelier to run between other jobs' slices)."""
        with torch.inference_mode(), eval_mode(model):
            return time_fn(lambda: self.inputs.call(model), self.cuda, rounds, min_time)

    def measure_many(self, models: list, rounds: int = 30) -> list:
        """End-to-end seconds of each model: the fastest of `rounds` round-robin rounds (model A, B,
        C, A, B, C, ...), so a burst of load from another process hits every model alike."""
        best = [float("inf")] * len(models)
        for _ in range(rounds):
            for i, m in enumerate(models):
                best[i] = min(best[i], self.measure(m, rounds=1))
        return best

    def calibrate(self, genomes) -> dict:
        """Fit `offset` and `scale` to end-to-end measurements of `genomes`; returns the fit."""
        sums = [self.layer_sum(g) for g in genomes]
        slims = [apply_plan(self.channels, PruningPlan(keep=self.encoding.keep(g))) for g in genomes]
        rows = list(zip(sums, self.measure_many(slims)))
        s, m = np.asarray(sums), np.asarray([r[1] for r in rows])
        scale = 0.0
        if len(rows) >= 3 and np.ptp(s) > 0:
            scale, offset = np.polyfit(s, m, 1)
        if scale > 0:
            self.scale, self.offset = float(scale), float(offset)
        else:  # too few or degenerate points: keep scale 1, median overhead
            self.scale, self.offset = 1.0, float(statistics.median(m - s))
        return {"offset_s": self.offset, "scale": self.scale,
                "points": [{"layers_s": a, "measured_s": b} for a, b in rows]}

    def to_dict(self) -> dict:
        """JSON-plain contents (entries, fit), to reuse a table measured on the same device."""
        return {"offset": self.offset, "scale": self.scale,
                "entries": [[n, list(k), v] for (n, k), v in self.entries.items()]}

    def load_dict(self, data: dict) -> None:
        self.offset, self.scale = float(data["offset"]), float(data.get("scale", 1.0))
        for n, k, v in data["entries"]:
            if n not in self.genes or len(k) != len(self.genes[n]):
                raise ConfigError(f"latency table entry for node {n!r} does not fit this model")
            self.entries[(n, tuple(int(c) for c in k))] = float(v)


__all__ = ["LatencyTable", "node_genes", "time_fn"]
