"""Bench hygiene: a latency carries its quality (quartiles, spread, warm-up vs steady), an unstable
one is measured again and else flagged, and a flagged latency is never reported as a result (no
speedup number, no goal judgement) by the project's harness (`benches.harness`) nor by the
package's `fxprune bench MODEL`. Every timing here comes from a fake clock: an injected sequence
of per-call milliseconds, so nothing depends on how fast or loaded this machine is.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
import torch
from torch import nn

from benches.harness import BenchConfig
from benches.harness import suite as suite_module
from benches.harness.goals import evaluate_goals
from benches.harness.plots import _speedup
from benches.harness.report import head_to_head_table, header, render, side_by_side_table, speedup_table
from benches.harness.suite import ORIGINAL, _latency, _latency_line, latency_entry
from fxprune import benchmark as generic_bench
from fxprune.cli import main
from fxprune.errors import ConfigError
from fxprune.passes.inputs import ExampleInputs
from fxprune.latency import (EXTRA_ROUNDS, MIN_WARMUP, SPREAD_LIMIT, LatencyMeasurement, LatencyMeasurer,
                             interleaved_latency_ms, measure_latencies)


class FakeClock:
    """Per-call milliseconds from a sequence, then `then` forever (or a cycle of it); counts calls."""

    def __init__(self, seq, then=None):
        self.values = itertools.chain(seq, itertools.cycle(then) if isinstance(then, (list, tuple))
                                      else itertools.repeat(then))
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        value = next(self.values)
        assert value is not None, "the measurer made more calls than the test expected"
        return value


# (d) a stable sequence: the median and quartiles of the timed repeats, the warm-up kept apart

def test_stable_sequence_gives_median_and_quartiles():
    clock = FakeClock([10, 10, 10, 14, 10, 12, 13, 11])  # 3 warm-up calls, then 5 repeats
    m = LatencyMeasurer(repeats=5, warmup=3).measure({"m": clock})["m"]
    assert clock.calls == 8 and m.rounds == 1  # stable at once: no extra round
    assert m.stable and m.reason == ""
    assert (m.median_ms, m.q1_ms, m.q3_ms, m.min_ms, m.n) == (12, 11, 13, 10, 5)
    assert m.warmup_median_ms == 10 and m.warmup_ms == (10, 10, 10) and m.repeats_ms == (14, 10, 12, 13, 11)
    assert m.spread == pytest.approx(2 / 12) and m.warmup_ratio == pytest.approx(10 / 12)
    assert m.describe() == "12.0 ms"
    j = m.to_json()
    assert json.loads(json.dumps(j)) == j and j["stable"] is True and j["spread"] == pytest.approx(2 / 12)


def test_judge_quartiles_even_count_and_single_repeat():
    m = LatencyMeasurement.judge([4, 1, 3, 2])
    assert (m.q1_ms, m.median_ms, m.q3_ms) == (1.75, 2.5, 3.25)  # inclusive quartiles
    one = LatencyMeasurement.judge([7.0], [7.5])
    assert (one.q1_ms, one.median_ms, one.q3_ms, one.spread, one.stable) == (7, 7, 7, 0, True)
    with pytest.raises(ValueError):
        LatencyMeasurement.judge([])


# (a) the first calls are 10x slower than the rest: never reported at the first-call value

def test_slow_first_calls_are_warmup_not_result():
    # three slow first calls (allocation), then the steady 10 ms: the first round's warm-up median is
    # 10x its steady median, so the whole round is measured again with twice the warm-up
    clock = FakeClock([100, 100, 100], then=10)
    m = LatencyMeasurer(repeats=5, warmup=1).measure({"m": clock})["m"]
    assert m.median_ms == 10 and m.q1_ms == m.q3_ms == 10  # the steady value, not the first calls'
    assert m.stable and m.rounds == 2 and m.warmup_median_ms == 10
    assert clock.calls == (MIN_WARMUP + 5) + (2 * MIN_WARMUP + 5)


def test_slow_first_calls_flagged_when_not_remeasured():
    clock = FakeClock([100, 100, 100], then=10)
    m = LatencyMeasurer(repeats=5, warmup=1, extra_rounds=0).measure({"m": clock})["m"]
    assert m.median_ms == 10  # the warm-up is discarded even so
    assert not m.stable and "warm-up 10x steady" in m.reason and m.warmup_ratio == 10
    assert m.describe().startswith("unstable (warm-up")


def test_one_allocating_first_call_needs_no_extra_round():
    # the defect's case: 149 ms on the first call, 17 ms after. At least MIN_WARMUP warm-up calls
    # are made even when fewer are asked for, so the median of the warm-up ignores the first call
    clock = FakeClock([149.4], then=17.5)
    m = LatencyMeasurer(repeats=5, warmup=1).measure({"m": clock})["m"]
    assert m.stable and m.rounds == 1 and m.median_ms == 17.5 and m.warmup_ms[0] == 149.4
    assert clock.calls == MIN_WARMUP + 5


# (b) wild spread: measured again (bounded), then flagged

def test_wild_spread_is_remeasured_then_flagged():
    clock = FakeClock([], then=[5, 50, 5, 40, 9])  # never settles
    measurer = LatencyMeasurer(repeats=5, warmup=2)
    m = measurer.measure({"m": clock})["m"]
    assert m.rounds == 1 + EXTRA_ROUNDS and not m.stable
    assert m.spread > SPREAD_LIMIT and f"spread {m.spread:.0%}" in m.reason
    assert m.describe() == f"unstable ({m.reason})"
    # every round warms up again, twice as long as the one before; the number of rounds is bounded
    warmups = [measurer.warmup_calls(r) for r in range(1 + EXTRA_ROUNDS)]
    assert warmups == [MIN_WARMUP, 2 * MIN_WARMUP, 4 * MIN_WARMUP]
    assert clock.calls == sum(warmups) + (1 + EXTRA_ROUNDS) * 5
    assert len(m.warmup_ms) == warmups[-1] and m.n == 5  # the last round's numbers


def test_spread_settling_on_remeasurement_is_stable():
    clock = FakeClock([10, 10, 10, 5, 50, 5, 50, 9], then=10)  # a noisy first round, quiet after
    m = LatencyMeasurer(repeats=5).measure({"m": clock})["m"]
    assert m.stable and m.rounds == 2 and m.median_ms == 10


def test_group_is_remeasured_together_side_by_side():
    steady, wild = FakeClock([], then=10), FakeClock([], then=[5, 50, 5, 40, 9])
    out = LatencyMeasurer(repeats=5, extra_rounds=1).measure({"a": steady, "b": wild})
    assert out["a"].stable and not out["b"].stable
    assert out["a"].rounds == out["b"].rounds == 2  # both from the same (last) round
    assert steady.calls == wild.calls  # timed round-robin, call for call


def test_measurer_rejects_bad_settings():
    for bad in (dict(repeats=0), dict(warmup=-1), dict(extra_rounds=-1), dict(max_spread=0),
                dict(max_warmup_ratio=0.5)):
        with pytest.raises(ValueError):
            LatencyMeasurer(**bad)
    for bad in (dict(latency_extra_rounds=-1), dict(latency_max_spread=0), dict(latency_max_warmup_ratio=0.9)):
        with pytest.raises(ConfigError):
            BenchConfig(models=["resnet18"], **bad).validate()


# real (tiny) models: the measurer's calls happen, the old entry point keeps its keys

class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(8, 4), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def test_measure_latencies_warms_every_model_up():
    x = ExampleInputs.normalize(torch.randn(2, 8))
    a, b = Counted().eval(), Counted().train()
    out = measure_latencies({"a": a, "b": b}, x, LatencyMeasurer(repeats=2, warmup=1, extra_rounds=0))
    assert a.calls == b.calls == MIN_WARMUP + 2  # at least MIN_WARMUP warm-up calls for each model
    assert all(m.n == 2 and len(m.warmup_ms) == MIN_WARMUP and m.median_ms > 0 for m in out.values())
    assert b.training and not a.training  # the modes come back


def test_interleaved_latency_keeps_its_keys_and_adds_the_quality():
    x = ExampleInputs.normalize(torch.randn(2, 8))
    m = Counted()
    ms = interleaved_latency_ms({"m": m}, x, repeats=3, warmup=1)["m"]
    assert m.calls == 4  # exactly the warm-up asked for, one round
    assert len(ms["repeats_ms"]) == 3 and 0 < ms["min_ms"] <= ms["median_ms"]
    assert {"q1_ms", "q3_ms", "spread", "warmup_median_ms", "stable", "reason"} <= set(ms)


# (c) the report: 'unstable' and no speedup number for a flagged pair, the number for a stable one

ENTRY = {"spec": "fxprune:tiny", "macs": 4_000_000, "variants": [
    {"tool": "fxprune", "key": "fxprune 0.5", "flops": 0.5, "round_to": None, "macs": 2_000_000, "ok": True},
    {"tool": "fxprune", "key": "fxprune 0.3", "flops": 0.3, "round_to": None, "macs": 1_000_000, "ok": True}]}


def _results(original: LatencyMeasurement, slim: dict) -> dict:
    lat = {"device": "cpu", "dtype": "float32", "torch_compile": False, "batch": 32, "load_before": 0.5,
           "load_after": 0.6, **latency_entry(original, slim, ENTRY)}
    return {"models": {"resnet50": {**ENTRY, "latency": [lat]}}, "machine": {"versions": {}},
            "config": BenchConfig(models=["resnet50"]).to_json()}


STEADY_20 = LatencyMeasurement.judge([20, 20.2, 19.8, 20.1, 19.9], [21, 20, 20])
STEADY_10 = LatencyMeasurement.judge([10, 10.1, 9.9, 10.05, 9.95], [10, 10, 10])
WILD = LatencyMeasurement.judge([2, 14.6, 3, 30, 14.6], [149.4, 150, 140])


def _row(table: str, first_cells: str) -> str:
    return next(line for line in table.splitlines() if line.replace(" ", "").startswith(first_cells))


def test_report_marks_an_unstable_pair_and_keeps_the_stable_one():
    res = _results(STEADY_20, {"fxprune 0.5": STEADY_10, "fxprune 0.3": WILD})
    slim = res["models"]["resnet50"]["latency"][0]["slim"]
    # the JSON records the flag and the spread; no speedup is computed from the unstable latency
    assert slim["fxprune 0.5"]["stable"] and slim["fxprune 0.5"]["speedup"] == pytest.approx(2.0)
    bad = slim["fxprune 0.3"]
    assert bad["stable"] is False and bad["speedup"] is None and bad["efficiency"] is None
    assert bad["latency"]["stable"] is False and bad["latency"]["spread"] == pytest.approx(WILD.spread)
    assert "spread" in bad["reason"]
    assert json.loads(json.dumps(res))["models"]["resnet50"]["latency"][0]["slim"]["fxprune 0.3"]["stable"] is False

    table = speedup_table(res, ("cpu", "float32", False, 32))
    good_row, bad_row = _row(table, "||0.5|"), _row(table, "||0.3|")
    cells = [c.strip() for c in good_row.split("|")[7:11]]  # latency ms, spread, speedup, ÷ MACs reduction
    assert cells == ["10.0", "1%", "2.00", "**1.00**"]  # 2x for a 2x MACs cut
    assert f"unstable (spread {WILD.spread:.0%}" in bad_row and "**" not in bad_row
    cells = [c.strip() for c in bad_row.split("|")[7:11]]
    assert cells[0].startswith("unstable (spread") and cells[1] == f"{100 * WILD.spread:.0f}%"
    assert cells[2].startswith("unstable (spread") and cells[3] == ""  # no speedup, no bold judgement
    assert f"{STEADY_20.median_ms / WILD.median_ms:.2f}" not in bad_row  # no number from the unstable median
    md = render(res)
    assert "unstable (spread" in md and "measured again" in header(res)


def test_report_unstable_original_means_no_speedup_at_all():
    res = _results(WILD, {"fxprune 0.5": STEADY_10, "fxprune 0.3": STEADY_10})
    lat = res["models"]["resnet50"]["latency"][0]
    assert not lat["stable"] and all(s["speedup"] is None and not s["stable"] for s in lat["slim"].values())
    assert all(s["reason"].startswith("original spread") for s in lat["slim"].values())
    table = speedup_table(res, ("cpu", "float32", False, 32))
    original_row = _row(table, "|resnet50|original|")
    assert "unstable (spread" in original_row and original_row.split("|")[9].strip() == ""
    assert "**" not in table
    for flops in ("0.5", "0.3"):
        speedup, judged = (c.strip() for c in _row(table, f"||{flops}|").split("|")[9:11])
        assert speedup.startswith("unstable (original spread") and judged == ""
    assert "original unstable (spread" in _latency_line(lat)
    # the goal on this speedup is not judged
    goal = evaluate_goals(res)[2]
    assert goal["met"] is None and goal["detail"].startswith("not judged: latency unstable")


def test_goals_and_side_by_side_skip_unstable_speedups():
    entry = dict(ENTRY, variants=[dict(ENTRY["variants"][0], macs_fraction=0.5, output_shapes_match=True),
                                  {"tool": "torch_pruning", "key": "torch_pruning 0.5", "flops": 0.5, "round_to": None,
                                   "macs": 2_000_000, "macs_fraction": 0.5, "ok": True, "ratio": 0.3,
                                   "output_shapes_match": True}])
    lat = {"device": "cpu", "dtype": "float32", "torch_compile": False, "batch": 32, "load_before": 0, "load_after": 0,
           **latency_entry(STEADY_20, {"fxprune 0.5": STEADY_10, "torch_pruning 0.5": WILD}, entry)}
    res = {"models": {"resnet50": {**entry, "latency": [lat]}}}
    goals = evaluate_goals(res)
    assert goals[2]["met"] is True  # fxprune's own speedup is stable: 2.00x for a 2x cut
    assert goals[3]["met"] is None and "Torch-Pruning spread" in goals[3]["detail"]
    row = _row(side_by_side_table(res), "|resnet50|")
    assert "2.00 / unstable (spread" in row
    # an unstable pair-by-pair timing is shown unstable and judges nothing
    res["models"]["resnet50"]["head_to_head"] = {
        "flops": 0.5, "batch": 32, "pairs": 9, "pairs_ms": [(10, 10)] * 9, "ratio_median": 1.0, "ratio_q1": 0.7,
        "ratio_q3": 1.4, "spread": 0.7, "stable": False, "reason": "spread 70%", "load_before": 0, "load_after": 0,
        "macs_reduction": {"fxprune": 2.0, "torch_pruning": 2.0}}
    assert evaluate_goals(res)[3]["met"] is None
    h2h = _row(head_to_head_table(res), "|resnet50|")
    assert "unstable (spread 70%)" in h2h and "**" not in h2h


# the suite's wiring: the run's measurer (warm-up minimum, re-measurement) and the JSON it writes

def test_suite_latency_records_flags_from_its_measurer(monkeypatch):
    clocks = {ORIGINAL: FakeClock([150, 150, 150], then=20), "fxprune 0.5": FakeClock([], then=10),
              "fxprune 0.3": FakeClock([], then=[5, 50, 5, 40, 9])}
    seen = []

    def fake_measure(models, inputs, measurer):
        seen.append(measurer)
        return measurer.measure({name: clocks[name] for name in models})

    monkeypatch.setattr(suite_module, "measure_latencies", fake_measure)
    cfg = BenchConfig(models=["fxprune:tiny"], latency_repeats=5, warmup=1, threads=1).validate()
    slim = {"fxprune 0.5": nn.Linear(8, 4), "fxprune 0.3": nn.Linear(8, 4)}
    out = _latency(nn.Linear(8, 4), slim, ENTRY, (1, 8), "cpu", "float32", False, 1, cfg)
    assert seen[0].warmup_calls(0) == MIN_WARMUP and out["warmup"] == MIN_WARMUP  # 1 asked, MIN_WARMUP made
    assert out["rounds"] == 1 + EXTRA_ROUNDS  # the wild one asked for every extra round
    assert out["original_ms"] == 20 and out["original"]["stable"]  # the 150 ms first calls never count
    assert out["slim"]["fxprune 0.5"]["speedup"] == pytest.approx(2.0) and out["slim"]["fxprune 0.5"]["stable"]
    assert out["slim"]["fxprune 0.3"]["speedup"] is None and not out["stable"]
    assert out["max_spread"] == SPREAD_LIMIT


def test_plots_leave_unstable_speedups_out():
    assert _speedup(None) == 0.0  # did not convert
    assert _speedup({"speedup": 1.8, "stable": True}) == 1.8 and _speedup({"speedup": 1.8}) == 1.8
    assert math.isnan(_speedup({"speedup": None, "stable": False, "reason": "spread 35%"}))


# the package's `fxprune bench MODEL`: an unstable latency is printed as such, with no speedup

def _bench_with_clocks(monkeypatch, capsys, tmp_path, clocks: dict) -> tuple[str, dict]:
    def fake_measure(models, inputs, measurer):
        return measurer.measure({name: clocks[name] for name in models})

    monkeypatch.setattr(generic_bench, "measure_latencies", fake_measure)
    out = tmp_path / "bench.json"
    assert main(["bench", "fxprune:lenet5", "--batch", "1", "--threads", "1", "--repeats", "5", "--json",
                 str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def _cells(text: str, variant: str) -> list[str]:
    line = next(line for line in text.splitlines() if f"| {variant} " in line)
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_fxprune_bench_unstable_slim_latency_prints_no_speedup(monkeypatch, capsys, tmp_path):
    wild = FakeClock([], then=[5, 50, 5, 40, 9])  # never settles, whatever the extra rounds
    text, res = _bench_with_clocks(monkeypatch, capsys, tmp_path, {"original": FakeClock([], then=20), "slim": wild})
    lat = res["models"][0]["latency"][0]
    assert lat["speedup"] is None and lat["stable"] is False and lat["reason"].startswith("slim spread")
    assert lat["slim"]["rounds"] == 1 + EXTRA_ROUNDS and lat["original"]["stable"]
    original, slim = _cells(text, "original"), _cells(text, "slim")
    assert original[9] == "20.00 ms"
    assert slim[9].startswith("unstable (spread") and slim[10] == "none (unstable)"
    median = statistics.median([5, 50, 5, 40, 9])
    assert f"{20 / median:.2f}" not in text and "x |" not in text.split("| slim")[1].splitlines()[0]


def test_fxprune_bench_unstable_original_prints_no_speedup(monkeypatch, capsys, tmp_path):
    wild = FakeClock([], then=[20, 200, 20, 160, 36])  # never settles: median 36 ms
    text, res = _bench_with_clocks(monkeypatch, capsys, tmp_path, {"original": wild, "slim": FakeClock([], then=18)})
    lat = res["models"][0]["latency"][0]
    assert lat["speedup"] is None and lat["reason"].startswith("original spread") and lat["slim"]["stable"]
    assert _cells(text, "original")[9].startswith("unstable (spread") and _cells(text, "slim")[9] == "18.00 ms"
    assert _cells(text, "slim")[10] == "none (unstable)"
    assert "2.00x" not in text  # 36 ms / 18 ms is never printed


def test_fxprune_bench_stable_latencies_give_the_speedup(monkeypatch, capsys, tmp_path):
    text, res = _bench_with_clocks(monkeypatch, capsys, tmp_path,
                                   {"original": FakeClock([149.4], then=20), "slim": FakeClock([], then=10)})
    lat = res["models"][0]["latency"][0]
    assert lat["stable"] and lat["speedup"] == 2.0 and lat["original"]["median_ms"] == 20  # first call is warm-up
    assert _cells(text, "slim")[9:] == ["10.00 ms", "2.00x"]
