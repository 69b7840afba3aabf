"""The latency model (fxprune.latency_model): staircase edges, the separable table, predictions
after the fit, the disk cache, and a real profile of a tiny model on the CPU.

No test asserts a speed: measured numbers are only checked for sanity (positive, within a wide
factor of each other); everything exact runs on injected fake timers.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ArtifactError, ConfigError
from fxprune.latency_model import (
    LatencyModel,
    TimedCall,
    detect_steps,
    measure_model,
    profile_latency,
)
from fxprune.latency_model import profile as prof
from fxprune.latency_model.steps import (
    Curves,
    estimate_alpha,
    monotone_envelope,
    separable,
    step_intervals,
)
from fxprune.nets import lenet5, resnet20
from fxprune.passes.inputs import ExampleInputs
from fxprune.passes.shapes import VALUE

# ---------------------------------------------------------------------------------- detect_steps


def _staircase(counts, edges, heights):
    """Time heights[j] on the j-th step, whose last count is edges[j]."""
    return np.asarray([heights[int(np.searchsorted(edges, c))] for c in counts], dtype=float)


def test_detect_steps_clean_staircase():
    counts = np.arange(1, 41)
    times = _staircase(counts, [10, 25, 40], [1.0, 2.0, 3.0])
    assert detect_steps(counts, times).tolist() == [10, 25, 40]


def test_detect_steps_noisy_staircase():
    rng = np.random.default_rng(0)
    counts = np.arange(1, 41)
    times = _staircase(counts, [10, 25, 40], [1.0, 1.3, 1.8]) * (1 + rng.uniform(-0.015, 0.015, len(counts)))
    assert detect_steps(counts, times).tolist() == [10, 25, 40]


def test_detect_steps_noise_spike_inside_a_step_moves_nothing():
    counts = np.arange(1, 21)
    times = _staircase(counts, [10, 20], [1.0, 2.0])
    times[4] = 1.5  # one slow sample in the first step
    assert detect_steps(counts, times).tolist() == [10, 20]


def test_detect_steps_monotone_curve_every_coarse_count_is_an_edge():
    counts = np.array([8, 16, 24, 32, 40, 48, 56, 64])
    assert detect_steps(counts, counts * 1e-3).tolist() == counts.tolist()


def test_detect_steps_ramp_finer_than_rel_jump_keeps_each_step_within_it():
    counts = np.arange(1, 201)
    times = 100.0 + counts
    edges = detect_steps(counts, times, rel_jump=0.05)
    assert edges[-1] == 200 and 3 < len(edges) < 200
    starts = np.concatenate([[1], edges[:-1] + 1])
    for s, e in zip(starts, edges):  # each step spans at most rel_jump of time, and the next count leaves it
        assert times[e - 1] <= times[s - 1] * 1.05 + 1e-12
        if e < 200:
            assert times[e] > times[s - 1] * 1.05


def test_detect_steps_flat_curve_has_only_the_last_count():
    counts = np.arange(8, 65, 8)
    assert detect_steps(counts, np.full(len(counts), 2e-3)).tolist() == [64]


def test_detect_steps_single_step():
    counts = np.arange(1, 33)
    times = np.where(counts <= 17, 1.0, 1.5)
    assert detect_steps(counts, times).tolist() == [17, 32]


def test_detect_steps_gpu_like_tiles_of_8_channels():
    rng = np.random.default_rng(1)
    counts = np.arange(1, 65)
    times = (2e-5 + 1e-5 * np.ceil(counts / 8)) * (1 + rng.uniform(-0.005, 0.005, len(counts)))
    assert detect_steps(counts, times).tolist() == list(range(8, 65, 8))


def test_detect_steps_inputs():
    assert detect_steps(np.array([], dtype=np.int64), np.array([])).tolist() == []
    assert detect_steps([5], [1.0]).tolist() == [5]
    with pytest.raises(ValueError):
        detect_steps([3, 2, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        detect_steps([1, 2], [1.0])
    with pytest.raises(ValueError):
        detect_steps([1, 2], [1.0, float("nan")])


def test_monotone_envelope_and_step_intervals():
    assert monotone_envelope([1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.0, 3.0, 4.0]  # median of 3 first
    assert monotone_envelope([1.0, 2.0, 9.0, 3.0, 4.0]).tolist() == [1.0, 2.0, 3.0, 4.0, 4.0]  # one outlier
    assert monotone_envelope([3.0, 1.0]).tolist() == [2.0, 2.0]  # pooled
    rng = np.random.default_rng(0)
    assert np.all(np.diff(monotone_envelope(rng.normal(size=50))) >= 0)
    ks = [1, 9, 16, 24]
    assert step_intervals(ks, [1.0, 1.0, 2.0, 2.0]) == [1]  # the step hides between 9 and 16
    assert step_intervals(ks, [1.0, 2.0, 3.0, 4.0]) == []  # a ramp: nothing to bisect


# ---------------------------------------------------------------------------------- separable tables


def _axes_and_corners(f, I, O, grid_i, grid_o, corners):
    r_in = np.array([f(i, O) for i in grid_i])
    r_out = np.array([f(I, o) for o in grid_o])
    rows = [(f(i, O), f(I, o), f(i, o)) for i, o in corners]
    floor = min(r_in.min(), r_out.min())
    return r_in, r_out, rows, floor


@pytest.mark.parametrize("f, alpha", [
    (lambda i, o: (2.0 + i) * (3.0 + 0.5 * o), 0.0),  # separable: a product
    (lambda i, o: 1e-6 * i * o + 1e-5 * o + 1e-4, 1e-4),  # a i o + b o + c: product plus a constant
])
def test_separable_table_is_exact(f, alpha):
    I, O = 64, 48
    grid_i, grid_o = np.arange(8, 65, 8), np.arange(6, 49, 6)
    r_in, r_out, rows, floor = _axes_and_corners(f, I, O, grid_i, grid_o, [(8, 6), (24, 18), (32, 24)])
    a = estimate_alpha(f(I, O), rows, floor)
    assert a == pytest.approx(alpha, abs=1e-12)
    curves = Curves([(grid_i, r_in, "linear"), (grid_o, r_out, "linear")])
    for i in (8, 13, 40, 64):  # on and between grid points: both functions are linear along each axis
        for o in (6, 11, 30, 48):
            ti = curves.evaluate(np.array([0]), np.array([float(i)]))
            to = curves.evaluate(np.array([1]), np.array([float(o)]))
            got = separable(ti, to, a, r_in[-1], r_out[-1])[0]
            assert got == pytest.approx(f(i, o), rel=1e-9)


def test_curves_ceil_mode_takes_the_next_tile():
    c = Curves([(np.array([8.0, 16.0, 24.0]), np.array([1.0, 2.0, 3.0]), "ceil"),
                (np.array([8.0, 16.0]), np.array([1.0, 2.0]), "linear")])
    got = c.evaluate(np.array([0, 0, 0, 0, 1]), np.array([3.0, 8.0, 9.0, 24.0, 12.0]))
    assert got.tolist() == [1.0, 1.0, 2.0, 3.0, 1.5]


# ---------------------------------------------------------------------------------- fake timers

A, B, C, OVERHEAD = 1e-6, 1e-5, 1e-4, 3e-3


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def _layer_formula(i, o):
    return A * i * o + B * o + C


class FakeTimer:
    """Layer time a i o + b o + c of its channels; a model: a fixed overhead plus its layers' sum."""

    def __init__(self, groups):
        self.big, self.small = groups  # (index of the 32-unit group, of the 24-unit group)
        self.calls: list[TimedCall] = []

    def expected(self, kept) -> float:
        k0, k1 = kept.get(self.big, 32), kept.get(self.small, 24)
        f = _layer_formula
        return OVERHEAD + f(16, k0) + f(k0, k0) + f(k0, k1) + f(k1, k1) + f(k1, 4)

    def __call__(self, call: TimedCall) -> float:
        self.calls.append(call)
        if call.kind == "layer":
            return _layer_formula(call.in_channels, call.out_channels)
        return self.expected(call.kept)


def _mlp_analysis(batch=2, features=16):
    model = _mlp()
    analysis = fxprune.analyze(model, torch.randn(batch, features))
    sizes = {g.n_units: g.index for g in analysis.channels.prunable_groups}
    return model, analysis, (sizes[32], sizes[24])


def test_predict_matches_the_timer_after_the_fit_on_a_dense_grid(tmp_path):
    _, analysis, groups = _mlp_analysis()
    timer = FakeTimer(groups)
    lat = profile_latency(analysis, timer=timer, points=40, cache_dir=tmp_path)
    assert lat.scale == pytest.approx(1.0, rel=1e-6) and lat.offset == pytest.approx(OVERHEAD, rel=1e-5)
    assert lat.original_s == pytest.approx(timer.expected({}))
    rng = np.random.default_rng(0)
    for _ in range(20):
        kept = {groups[0]: int(rng.integers(1, 33)), groups[1]: int(rng.integers(1, 25))}
        assert lat.predict(kept) == pytest.approx(timer.expected(kept), rel=1e-9)
    assert lat.predict({}) == pytest.approx(timer.expected({}), rel=1e-9)
    assert {c.kind for c in timer.calls} == {"layer", "model"}


def test_predict_on_the_coarse_grid_is_close_and_monotone(tmp_path):
    _, analysis, groups = _mlp_analysis()
    timer = FakeTimer(groups)
    lat = profile_latency(analysis, timer=timer, points=4, cache_dir=tmp_path)
    big, small = groups
    lowest = min(r["out"]["x"][0] for r in lat.layers() if r["out"] is not None and r["groups"] == [big])
    assert lowest == 8  # 32 units, 4 points: 8, 16, 24, 32 (multiples of 8 channels)
    for k0 in range(1, 33):
        for k1 in range(1, 25):
            kept = {big: k0, small: k1}
            if k0 >= lowest:  # within the grid: interpolated (the activations' quadratic curves) and fitted
                assert lat.predict(kept) == pytest.approx(timer.expected(kept), rel=0.01)
            else:  # below the grid: the smallest measured width's time, an upper bound
                assert timer.expected(kept) * 0.999 <= lat.predict(kept) <= lat.predict({**kept, big: lowest})
    for g, n in ((big, 32), (small, 24)):
        seq = [lat.predict({g: k}) for k in range(1, n + 1)]
        assert all(b >= a for a, b in itertools.pairwise(seq))
    steps = lat.group_steps(big)
    assert steps[-1] == 32 and np.all(np.diff(steps) > 0)
    with pytest.raises(ConfigError):
        lat.predict({big: 33})
    with pytest.raises(ConfigError):
        lat.predict({999: 1})


def test_the_layer_table_is_exact_off_grid_for_a_product_plus_constant(tmp_path):
    """The 2-D layer (the middle linear) is exact between grid points: only the activations'
    curves (a c^2 + b c + c0 along one axis) are interpolated with an error."""
    _, analysis, groups = _mlp_analysis()
    lat = profile_latency(analysis, timer=FakeTimer(groups), points=4, cache_dir=tmp_path)
    row = next(i for i, r in enumerate(lat.layers()) if r["in"] is not None and r["out"] is not None)
    for k0, k1 in ((9, 7), (13, 19), (31, 2)):  # k0 >= 8: within its grid (8, 16, 24, 32)
        t = lat.layer_times({groups[0]: k0, groups[1]: k1})[row]
        assert t == pytest.approx(_layer_formula(k0, k1), rel=1e-9)


def test_bisection_finds_a_step_between_coarse_grid_points(tmp_path):
    _, analysis, (big, small) = _mlp_analysis()

    def timer(call):
        if call.kind == "model":
            return 1e-3
        if call.node == "_2":  # the middle linear: a step after 13 of its 24 outputs
            return 1e-4 * (2.0 if call.out_channels > 13 else 1.0)
        return 1e-5

    lat = profile_latency(analysis, timer=timer, points=4, cache_dir=tmp_path)
    assert [r["node"] for r in lat.layers()][2] == "_2"
    assert lat.group_steps(small).tolist() == [13, 24]
    assert lat.group_steps(big).tolist() == [32]
    x = lat.layers()[2]["out"]["x"]
    assert 13 in x and 14 in x  # measured on both sides of the edge


def test_identical_layers_are_measured_once(tmp_path):
    model = resnet20()
    analysis = fxprune.analyze(model, torch.randn(1, 1, 32, 32))
    seen = []

    def timer(call):
        seen.append(call)
        return 1e-4 if call.kind == "layer" else 1e-2

    lat = profile_latency(analysis, timer=timer, points=3, cache_dir=tmp_path)
    layers = lat.layers()
    assert len({r["signature"] for r in layers}) == lat.profile["tables"] < len(layers)
    assert len({c.node for c in seen if c.kind == "layer"}) == lat.profile["tables"]
    assert all(r["in"] is not None or r["out"] is not None for r in layers)


def test_a_layer_that_cannot_run_alone_is_skipped(tmp_path, monkeypatch):
    _, analysis, groups = _mlp_analysis()
    real_build = prof.LayerBench.build

    def build(self, kept):
        if self.layer.node == "_2":
            raise RuntimeError("no kernel for this")
        return real_build(self, kept)

    monkeypatch.setattr(prof.LayerBench, "build", build)

    def timer(call):
        if call.kind == "layer":
            call.fn()
        return 1e-4 if call.kind == "layer" else 1e-2

    lat = profile_latency(analysis, timer=timer, points=3, cache_dir=tmp_path)
    assert "_2" not in [r["node"] for r in lat.layers()] and len(lat.layers()) == 4
    assert {"node": "_2", "reason": "cannot run alone: RuntimeError: no kernel for this"} in lat.profile["skipped"]
    assert lat.predict({groups[0]: 3}) > 0


def test_a_model_with_nothing_prunable_predicts_its_measured_time(tmp_path):
    analysis = fxprune.analyze(nn.Linear(4, 2), torch.randn(1, 4))
    lat = profile_latency(analysis, timer=lambda call: 2e-3, cache_dir=tmp_path)
    assert lat.layers() == [] and lat.predict({}) == pytest.approx(2e-3) and lat.original_s == 2e-3


# ---------------------------------------------------------------------------------- cache


class CountingTimer(FakeTimer):
    __qualname__ = "CountingTimer"


def test_same_key_loads_from_the_cache_without_timing(tmp_path):
    _, analysis, groups = _mlp_analysis()
    first = CountingTimer(groups)
    lat = profile_latency(analysis, timer=first, points=4, cache_dir=tmp_path)
    assert first.calls and lat.source == "measured"
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    again = CountingTimer(groups)
    cached = profile_latency(analysis, timer=again, points=4, cache_dir=tmp_path)
    assert again.calls == [] and cached.source == "cache"
    kept = {groups[0]: 9, groups[1]: 5}
    assert cached.predict(kept) == lat.predict(kept)
    assert cached.group_steps(groups[1]).tolist() == lat.group_steps(groups[1]).tolist()
    assert (cached.key, cached.original_s, cached.offset, cached.scale) == (lat.key, lat.original_s, lat.offset,
                                                                            lat.scale)
    refreshed = CountingTimer(groups)
    profile_latency(analysis, timer=refreshed, points=4, cache_dir=tmp_path, refresh=True)
    assert refreshed.calls


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    _, analysis, groups = _mlp_analysis()
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path))
    profile_latency(analysis, timer=CountingTimer(groups), points=4)
    assert len(list((tmp_path / "latency").glob("*.json"))) == 1


@pytest.mark.parametrize("change", [{"dtype": torch.float64}, {"batch": 3}, {"channels_last": True}])
def test_the_key_changes_with_the_settings(tmp_path, change):
    _, analysis, groups = _mlp_analysis()
    profile_latency(analysis, timer=CountingTimer(groups), points=4, cache_dir=tmp_path)
    timer = CountingTimer(groups)
    lat = profile_latency(analysis, timer=timer, points=4, cache_dir=tmp_path, **change)
    assert timer.calls and lat.source == "measured"
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_the_key_changes_with_device_compile_and_input_shape(monkeypatch):
    monkeypatch.setattr(prof, "device_name", lambda device: f"name of {device}")
    _, analysis, _ = _mlp_analysis()
    _, wider, _ = _mlp_analysis(batch=5)
    s = prof.settings_of(device="cpu", dtype=None, batch=None, channels_last=False, compile=False, threads=None,
                         rounds=3, points=7, default_dtype=torch.float32)
    base = prof.make_key(analysis.channels, analysis.inputs, s, None)
    variants = [
        prof.make_key(analysis.channels, analysis.inputs, dataclasses.replace(s, device=torch.device("cuda", 0)),
                      None),
        prof.make_key(analysis.channels, analysis.inputs, dataclasses.replace(s, compile="default"), None),
        prof.make_key(analysis.channels, analysis.inputs, dataclasses.replace(s, compile="reduce-overhead"), None),
        prof.make_key(wider.channels, wider.inputs, s, None),
        prof.make_key(analysis.channels, analysis.inputs, dataclasses.replace(s, dtype=torch.float16), None),
        prof.make_key(analysis.channels, prof.batched(analysis.inputs, 8), s, None),
        prof.make_key(analysis.channels, analysis.inputs, dataclasses.replace(s, channels_last=True), None),
    ]
    paths = {prof.cache_path(k, "/c") for k in [base, *variants]}
    assert len(paths) == 1 + len(variants)
    assert prof.cache_path(base, "/c") == prof.cache_path(json.loads(json.dumps(base)), "/c")


def _one_cache_file(tmp_path):
    (path,) = tmp_path.glob("*.json")
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated", "nan", "negative_time", "wrong_groups", "wrong_key",
                                    "unknown_node", "ragged_curve"])
def test_a_corrupt_cache_entry_is_measured_again(tmp_path, damage):
    _, analysis, groups = _mlp_analysis()
    lat = profile_latency(analysis, timer=CountingTimer(groups), points=4, cache_dir=tmp_path)
    path = _one_cache_file(tmp_path)
    data = json.loads(path.read_text())
    text = None
    if damage == "garbage":
        text = "\x00 not json {"
    elif damage == "truncated":
        text = path.read_text()[:200]
    elif damage == "nan":
        text = path.read_text().replace('"offset": ', '"offset": NaN, "x_offset": ', 1)
    elif damage == "negative_time":
        data["tables"][0]["out"]["t"][0] = -1.0
    elif damage == "wrong_groups":
        data["n_units"][str(groups[0])] = 31
    elif damage == "wrong_key":
        data["key"]["batch"] = 99
    elif damage == "unknown_node":
        data["layers"][0]["node"] = "no_such_node"
    elif damage == "ragged_curve":
        data["tables"][0]["out"]["x"].append(1e9)
    path.write_text(text if text is not None else json.dumps(data))
    timer = CountingTimer(groups)
    again = profile_latency(analysis, timer=timer, points=4, cache_dir=tmp_path)
    assert timer.calls and again.source == "measured"
    assert again.predict({}) == pytest.approx(lat.predict({}))
    assert json.loads(path.read_text())["key"] == lat.key  # rewritten, valid


def test_json_round_trip(tmp_path):
    _, analysis, groups = _mlp_analysis()
    lat = profile_latency(analysis, timer=FakeTimer(groups), points=4, cache_dir=tmp_path)
    data = json.loads(json.dumps(lat.to_json(), allow_nan=False))
    back = LatencyModel.from_json(data, analysis.channels)
    for kept in ({}, {groups[0]: 3}, {groups[0]: 17, groups[1]: 11}):
        assert back.predict(kept) == lat.predict(kept)
    assert back.layers() == lat.layers()
    with pytest.raises(ArtifactError):  # a model with other groups
        LatencyModel.from_json(data, fxprune.analyze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                                                     torch.randn(1, 4)).channels)


# ---------------------------------------------------------------------------------- options


@pytest.mark.parametrize("options", [{"device": "tpu"}, {"device": "not a device"}, {"dtype": torch.int32},
                                     {"dtype": "int8"}, {"batch": 0}, {"batch": 2.5}, {"rounds": 0}, {"points": 1},
                                     {"threads": 0}, {"channels_last": "yes"}, {"compile": 1}, {"compile": "fast"}, {"refresh": None},
                                     {"timer": 3}])
def test_bad_options_are_config_errors(tmp_path, options):
    _, analysis, _ = _mlp_analysis()
    with pytest.raises(ConfigError):
        profile_latency(analysis, cache_dir=tmp_path, **options)


def test_compile_modes_are_normalised_and_reach_torch_compile(monkeypatch):
    """compile=True means torch.compile's default mode; a mode name ("reduce-overhead": CUDA graphs)
    is passed to torch.compile as given; False / None is eager. The same in MeasureOn and the CLI."""
    from fxprune.arguments import compile_option
    from fxprune.cli import build_parser
    from fxprune.constraints import MeasureOn

    assert [compile_option(v) for v in (False, None, True, "reduce-overhead")] == [None, None, "default",
                                                                                  "reduce-overhead"]
    assert MeasureOn(compile=True).compile == "default" and MeasureOn().compile is None
    with pytest.raises(ConfigError, match="reduce-overhead"):
        MeasureOn(compile="fast")
    seen = []

    def fake_compile(model, mode=None):
        seen.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    _, analysis, _ = _mlp_analysis()
    for mode, expected in (("default", None), ("reduce-overhead", "reduce-overhead"), (None, "not compiled")):
        s = prof.settings_of(device="cpu", dtype=None, batch=None, channels_last=False, compile=mode, threads=None,
                             rounds=1, points=2, default_dtype=torch.float32)
        seen.clear()
        fn = prof.prepared_call(copy.deepcopy(analysis.channels.gm), analysis.inputs, s)
        fn()
        assert seen == ([] if mode is None else [expected])
    parser = build_parser()
    args = ["profile", "torchvision:resnet18"]
    assert parser.parse_args(args).compile is None
    assert parser.parse_args([*args, "--compile"]).compile == "default"
    assert parser.parse_args([*args, "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parser.parse_args([*args, "--compile", "cuda-graph"]).compile == "cuda-graph"


def test_graph_timed_layers_are_replays_of_several_calls_divided(monkeypatch):
    """Under a CUDA-graph mode a layer point is GRAPH_LAYER_CALLS calls captured in one graph and
    its time a replay's over that count (fakes: a capture that calls fn `calls` times, a clock
    reading how many layer calls ran); the key says so; a layer that cannot be captured is a
    ConfigError naming it and the fix."""
    ran = []
    monkeypatch.setattr(prof, "graph_timed", lambda s: True)
    monkeypatch.setattr(prof, "capture", lambda fn, device, calls=1: lambda: [fn() for _ in range(calls)][-1])

    def clock(fn, cuda):
        before = len(ran)
        fn()
        return float(len(ran) - before)  # 1 ms per layer call

    monkeypatch.setattr(prof, "time_call_ms", clock)
    s = prof.settings_of(device="cpu", dtype=None, batch=None, channels_last=False, compile=None, threads=None,
                         rounds=2, points=2, default_dtype=torch.float32)
    calls = [prof.TimedCall("layer", f"n{i}", "conv2d", 8, 8, {}, "sig", build=lambda: lambda: ran.append(1))
             for i in range(3)]
    times, ok = prof.time_layer_calls(calls, s)
    assert ok and times == [pytest.approx(1e-3)] * 3 and len(ran) > prof.GRAPH_LAYER_CALLS * 3
    _, analysis, _ = _mlp_analysis()
    key = prof.make_key(analysis.channels, analysis.inputs, s, None)
    assert key["grid"]["layer_calls_per_graph"] == prof.GRAPH_LAYER_CALLS

    def refuses(fn, device, calls=1):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(prof, "capture", refuses)
    with pytest.raises(ConfigError, match=r"layer n0 \(conv2d\) cannot be captured.*not permitted.*compile=False"):
        prof.time_layer_calls(calls[:1], s)
    monkeypatch.undo()
    assert "layer_calls_per_graph" not in prof.make_key(analysis.channels, analysis.inputs, s, None)["grid"]


def test_cuda_graph_capture_needs_cuda():
    """compile="cuda-graph" replays a captured CUDA graph: on the CPU a ConfigError names the fix."""
    with pytest.raises(ConfigError, match="needs device='cuda'.*compile=True / False on the CPU"):
        prof.settings_of(device="cpu", dtype=None, batch=None, channels_last=False, compile="cuda-graph",
                         threads=None, rounds=1, points=2, default_dtype=torch.float32)
    with pytest.raises(ConfigError, match="needs device='cuda'"):
        measure_model(nn.Linear(2, 2), torch.randn(1, 2), compile="cuda-graph")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_so(tmp_path):
    _, analysis, _ = _mlp_analysis()
    with pytest.raises(ConfigError, match="CUDA is not available"):
        profile_latency(analysis, device="cuda", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        measure_model(nn.Linear(2, 2), torch.randn(1, 2), device="cuda")


def test_not_an_analysis_is_a_config_error():
    with pytest.raises(ConfigError):
        profile_latency(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------- real, on this CPU


def _snapshot(model, analysis):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
            analysis.channels.gm.code, {n.name: n.meta.get(VALUE) for n in analysis.channels.gm.graph.nodes},
            [(g.index, g.n_units, g.prunable) for g in analysis.channels.groups], model.training)


def _assert_unchanged(before, model, analysis):
    after = _snapshot(model, analysis)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


@pytest.mark.parametrize("build, shape", [(lenet5, (1, 1, 28, 28)), (resnet20, (1, 1, 32, 32))])
def test_a_tiny_model_profiles_end_to_end_on_the_cpu(tmp_path, build, shape):
    torch.manual_seed(0)
    model = build().train()  # the user's flags come back too
    analysis = fxprune.analyze(model, torch.randn(shape))
    before = _snapshot(model, analysis)
    lat = profile_latency(analysis, batch=4, points=3, rounds=1, threads=1, cache_dir=tmp_path)
    _assert_unchanged(before, model, analysis)
    assert lat.original_s > 0 and lat.scale > 0 and lat.source == "measured"
    full = lat.predict({})
    assert 1 / 3 < full / lat.original_s < 3
    groups = analysis.channels.prunable_groups
    small = lat.predict({g.index: 1 for g in groups})
    assert small <= full
    assert lat.key["batch"] == 4 and lat.key["threads"] == 1 and lat.key["dtype"] == "float32"
    for g in groups:
        steps = lat.group_steps(g.index)
        assert steps[-1] == g.n_units and steps[0] >= 1 and np.all(np.diff(steps) > 0)
    for row in lat.layers():
        for side in ("in", "out"):
            if row[side] is not None:
                assert len(row[side]["x"]) == len(row[side]["t"]) >= 1 and min(row[side]["t"]) > 0
    json.dumps(lat.to_json(), allow_nan=False)
    cached = profile_latency(analysis, batch=4, points=3, rounds=1, threads=1, cache_dir=tmp_path)
    assert cached.source == "cache" and cached.predict({}) == full


def test_layer_bench_builds_every_point_a_fake_timer_sees(tmp_path):
    """Every layer point of a small residual net builds and runs on the CPU, with the channel counts
    the timer is told (fp64 and channels_last: the private copies are converted, the model is not)."""
    torch.manual_seed(0)
    model = resnet20()
    analysis = fxprune.analyze(model, torch.randn(1, 1, 32, 32))
    before = _snapshot(model, analysis)
    checked = []

    def timer(call):
        if call.kind == "layer":
            with torch.inference_mode():
                out = call.fn()
            assert out.dtype == torch.float64 and out.shape[0] == 2
            if call.out_channels is not None and out.ndim > 1:
                assert out.shape[1] == call.out_channels
            checked.append(call.node)
        return 1e-4 if call.kind == "layer" else 1e-2

    profile_latency(analysis, timer=timer, batch=2, dtype=torch.float64, channels_last=True, points=3,
                    cache_dir=tmp_path)
    assert checked
    _assert_unchanged(before, model, analysis)


def test_measure_model_leaves_the_model_alone():
    model = lenet5().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from fxprune.latency import LatencyMeasurer
    seconds = measure_model(model, torch.randn(2, 1, 28, 28), dtype=torch.float64,
                            measurer=LatencyMeasurer(repeats=2, warmup=1, min_warmup=1, extra_rounds=0))
    assert seconds > 0 and math.isfinite(seconds)
    assert model.training and all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_compile_profiles_end_to_end(tmp_path):
    """torch.compile on the CPU (inductor) is slow here: run with -m slow."""
    analysis = fxprune.analyze(lenet5(), torch.randn(1, 1, 28, 28))
    lat = profile_latency(analysis, compile=True, batch=2, points=3, rounds=1, cache_dir=tmp_path)
    assert lat.key["compile"] == "default" and lat.original_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_on_the_tile_grid(tmp_path):
    model = lenet5()
    analysis = fxprune.analyze(model, torch.randn(1, 1, 28, 28))
    before = _snapshot(model, analysis)
    lat = profile_latency(analysis, device="cuda", batch=8, rounds=3, cache_dir=tmp_path)
    _assert_unchanged(before, model, analysis)
    assert lat.key["device"].startswith("cuda") and lat.original_s > 0
    conv1 = next(r for r in lat.layers() if r["node"] == "conv1")
    assert conv1["interp"] == "ceil" and conv1["out"]["x"][:2] == [8.0, 16.0]
    assert 1 / 3 < lat.predict({}) / lat.original_s < 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_computes_the_eager_forward_and_profiles(tmp_path):
    """The captured graph's replay returns the eager forward's output (fp32, 1e-5: the same kernels)
    after everything the caller held was dropped and the allocator's cache emptied, the
    user's model is untouched, and a profile under compile="cuda-graph" fits and keys on the mode."""
    model = lenet5()
    x = torch.randn(8, 1, 28, 28)
    analysis = fxprune.analyze(model, x[:1])
    before = _snapshot(model, analysis)
    gm = copy.deepcopy(analysis.channels.gm).cuda().eval()
    inputs = ExampleInputs((x.cuda(),), {})
    with torch.inference_mode():
        expected = gm(x.cuda())
    replay = prof.captured_call(copy.deepcopy(gm), inputs, torch.device("cuda", 0))
    del gm, inputs  # the captured copy, the inputs and the output live as long as the replay function
    torch.cuda.empty_cache()
    for _ in range(3):
        torch.cuda.synchronize()
        torch.testing.assert_close(replay(), expected, rtol=1e-5, atol=1e-5)  # the same kernels, fp32
    lat = profile_latency(analysis, device="cuda", batch=8, rounds=3, compile="cuda-graph", cache_dir=tmp_path)
    _assert_unchanged(before, model, analysis)
    assert lat.key["compile"] == "cuda-graph" and lat.original_s > 0


def test_in_place_layers_do_not_overwrite_the_shared_input_buffer():
    """SiLU(inplace=True), relu_ and `x += y` timed alone on views of the shared buffer used to
    rewrite it on every call (values decaying to subnormals, then zeros: slow, then wrong)."""
    import math as _math

    from fxprune.latency_model import layers

    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.act = torch.nn.SiLU(inplace=True)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.act(self.conv(x))
            z = self.conv2(y)
            z += y
            return self.head(z.relu_())

    a = fxprune.analyze(InPlace().eval(), torch.randn(2, 3, 8, 8))
    specs = layers.specs_at(a.channels, a.inputs, a.inputs)
    found = layers.find_layers(a.channels, specs)[0]
    buf = layers.InputBuffer(torch.device("cpu"))
    benches = [layers.LayerBench(a.channels, spec, specs, device=torch.device("cpu"), dtype=torch.float32,
                                 channels_last=False, buffer=buf) for spec in found]
    runs = [b.build({}) for b in benches]
    before = buf.flat[torch.float32].clone()
    for _ in range(50):
        for run in runs:
            run()
    assert torch.equal(buf.flat[torch.float32], before)
    assert _math.isfinite(float(before.abs().median())) and {"SiLU", "iadd", "relu_"} & {s.op for s in found}


def test_predict_rows_equals_predict_for_every_row(tmp_path):
    _, analysis, groups = _mlp_analysis()
    lat = profile_latency(analysis, timer=FakeTimer(groups), points=4, cache_dir=tmp_path)
    order = lat.group_order
    assert order == sorted(groups)
    rng = np.random.default_rng(1)
    rows = np.array([[rng.integers(1, lat.n_units[g] + 1) for g in order] for _ in range(25)])
    batched = lat.predict_rows(rows)
    single = [lat.predict(dict(zip(order, map(int, r)))) for r in rows]
    np.testing.assert_allclose(batched, single, rtol=1e-12)
    assert lat.predict_rows(rows[0]).shape == (1,)
    with pytest.raises(ConfigError):
        lat.predict_rows(np.ones((2, len(order) + 1)))


@pytest.mark.parametrize("stable,age_s,measured_again", [(True, 10 * 86400, False), (False, 60, False),
                                                         (False, 2 * 86400, True)])
def test_an_unstable_profile_is_reused_for_a_while_only(tmp_path, stable, age_s, measured_again):
    import json
    import time

    from fxprune.latency_model.profile import UNSTABLE_TTL_S

    assert 60 < UNSTABLE_TTL_S < 86400
    _, analysis, groups = _mlp_analysis()
    first = FakeTimer(groups)
    profile_latency(analysis, timer=first, points=3, cache_dir=tmp_path)
    [path] = list(tmp_path.rglob("*.json"))
    data = json.loads(path.read_text())
    assert time.time() - data["saved_at"] < 600
    data["fit"]["stable"], data["saved_at"] = stable, time.time() - age_s
    path.write_text(json.dumps(data))
    again = FakeTimer(groups)
    profile_latency(analysis, timer=again, points=3, cache_dir=tmp_path)
    assert bool(again.calls) == measured_again


def test_removed_nodes_count_nothing_in_every_prediction(tmp_path):
    """predict / predict_rows with `removed` node names (a plan's removed residual branches) leave
    those layers' times out, exactly: the fit's scale times each removed layer's time."""
    _, analysis, groups = _mlp_analysis()
    lat = profile_latency(analysis, timer=FakeTimer(groups), points=10, cache_dir=tmp_path)
    kept = {groups[0]: 20, groups[1]: 12}
    times = lat.layer_times(kept)
    names = [row["node"] for row in lat.layers()]
    gone = frozenset(names[1:3])
    expected = lat.predict(kept) - lat.scale * float(times[1] + times[2])
    assert lat.predict(kept, gone) == pytest.approx(expected, rel=1e-12)
    assert lat.predict(kept, frozenset({"not_a_node"})) == pytest.approx(lat.predict(kept), rel=1e-12)
    row = np.asarray([[kept.get(g, lat.n_units[g]) for g in lat.group_order]], dtype=np.float64)
    assert lat.predict_rows(row, gone)[0] == pytest.approx(expected, rel=1e-12)
