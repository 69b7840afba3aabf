"""The project's benchmark harness (`python -m benches.harness`, in the repository's benches/harness)
on a tiny model: the tables are produced, the numbers are positive and consistent with each other
and with an independent MAC count, the goals are judged right, and the Torch-Pruning comparison is
skipped with a clear message when it is not installed. Then the package's own generic
``fxprune bench MODEL`` command: its table, its JSON, and no speedup from an unstable latency.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from torch import nn

import fxprune
from benches.harness import BenchConfig, render, run_suite, write_doc, write_json
from benches.harness.cli import main as harness_main
from benches.harness.goals import evaluate_goals
from benches.harness.kernels import kernel_bench_file, run_kernel_benchmarks
from benches.harness.machine import REPO
from benches.harness.memory import PeakMemory
from benches.harness.metrics import count_macs, count_params
from benches.harness.plots import write_plots
from benches.harness.report import BEGIN, END, LEGACY_MARKERS
from benches.harness.suite import cuda_status, merge_results
from fxprune import benchmark as generic_bench
from fxprune.cli import main
from fxprune.passes.inputs import ExampleInputs
from fxprune.latency import (EXTRA_ROUNDS, MIN_WARMUP, _glibc, interleaved_latency_ms,
                             paired_latency_ratio, steady_heap)
from fxprune.models import build_model, example_input

from .conftest import measured_macs

SPEC, NAME, SHAPE = "fxprune:resnet20", "resnet20", (1, 1, 16, 16)


def tiny_config(**kw) -> BenchConfig:
    base = dict(models=[SPEC], flops=(0.5,), round_to=(None, 8), batches=(1, 2), threads=1, devices=("cpu",),
                compile_repeats=1, method_repeats=1, latency_repeats=3, warmup=1, input_shapes={NAME: SHAPE})
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def results():
    """One run on ResNet-20 at 16x16: Torch-Pruning included where it is installed."""
    torch.manual_seed(0)  # the model's random weights decide which channels go
    return run_suite(tiny_config(head_to_head_models=(NAME,), head_to_head_pairs=3), log=lambda _: None)


def _hide(monkeypatch, module: str) -> None:
    """Make `import module` fail as if it were not installed."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_original_model_counts_match_independent_counter(results):
    entry = results["models"][NAME]
    model = build_model(SPEC).eval()
    x = example_input(SHAPE)
    assert entry["macs"] == measured_macs(model, x) > 0
    assert entry["params"] == sum(p.numel() for p in model.parameters())
    assert entry["output_shapes"] == [(1, 10)]


def test_compile_speed_numbers_are_positive_and_add_up(results):
    c = results["models"][NAME]["compile"]
    stages = c["stages_s"]
    assert all(stages[k] > 0 for k in ("trace", "shapes", "analysis", "method", "rewrite", "verify", "total"))
    # one counted repeat: the medians are that run's numbers, so the sums are exact
    assert c["compile_s"] == pytest.approx(stages["trace"] + stages["shapes"] + stages["analysis"] + stages["rewrite"])
    assert c["compile_with_method_s"] == pytest.approx(c["compile_s"] + stages["method"])
    assert stages["total"] >= c["compile_with_method_s"] + stages["verify"] - 1e-6
    assert c["peak_mib"] >= 0 and c["peak_method"]
    assert set(c["methods_s"]) == set(fxprune.DATA_FREE_METHODS)
    assert all(v > 0 for v in c["methods_s"].values())


def test_fxprune_slim_models_meet_target_and_are_counted_alike(results):
    entry = results["models"][NAME]
    fx = [v for v in entry["variants"] if v["tool"] == "fxprune"]
    assert [(v["flops"], v["round_to"]) for v in fx] == [(0.5, None), (0.5, 8)]
    for v in fx:
        assert v["ok"] and v["output_shapes_match"]
        assert v["macs"] == v["macs_report"], "the cost model and FlopCounterMode disagree"
        assert 0 < v["macs_fraction"] <= 0.5
        assert v["macs_fraction"] == pytest.approx(v["macs"] / entry["macs"])
        assert v["params"] < entry["params"]
        assert v["max_rel_error"] <= 1e-4
        assert v["compile_s"] > 0


def test_latency_numbers_are_consistent(results):
    entry = results["models"][NAME]
    lat = entry["latency"]
    assert [(x["device"], x["dtype"], x["torch_compile"], x["batch"]) for x in lat] == [
        ("cpu", "float32", False, 1), ("cpu", "float32", False, 2)]
    macs = {v["key"]: v["macs"] for v in entry["variants"] if v["ok"]}
    for x in lat:
        assert x["repeats"] == 3 and x["threads"] == 1 and x["load_before"] >= 0
        assert x["warmup"] >= MIN_WARMUP  # 1 asked for; the first calls allocate
        assert 0 < x["original_min_ms"] <= x["original_ms"]
        o = x["original"]  # the latency's quality, whatever this machine's load made of it
        assert o["median_ms"] == x["original_ms"] and o["q1_ms"] <= o["median_ms"] <= o["q3_ms"]
        assert o["n"] == 3 and len(o["warmup_ms"]) >= MIN_WARMUP and 1 <= o["rounds"] <= 1 + EXTRA_ROUNDS
        assert o["stable"] == (o["reason"] == "")
        assert set(x["slim"]) == set(macs)
        for key, s in x["slim"].items():
            assert 0 < s["min_ms"] <= s["ms"] == s["latency"]["median_ms"]
            assert s["latency"]["rounds"] == o["rounds"]  # timed side by side, in the same rounds
            assert s["macs_reduction"] == pytest.approx(entry["macs"] / macs[key]) and s["macs_reduction"] >= 2
            assert s["stable"] == (o["stable"] and s["latency"]["stable"])
            if s["stable"]:
                assert s["speedup"] == pytest.approx(x["original_ms"] / s["ms"])
                assert s["efficiency"] == pytest.approx(s["speedup"] / s["macs_reduction"])
            else:  # an unstable latency is no result: no speedup from it
                assert s["speedup"] is None and s["efficiency"] is None and s["reason"]


def test_tables_and_json(results, tmp_path):
    md = render(results)
    for heading in ("## Goals", "## Compile speed", "### Method pass", "## Realized speedup: cpu, float32, "
                    "torch.compile off, batch 1", "batch 2", "## GPU", "## Kernel benchmarks"):
        assert heading in md
    assert "| GMACs" in md and "| GFLOPs" in md  # MACs and FLOPs in separate columns
    assert md.count("| resnet20") >= 4  # compile, methods and one latency table per batch
    entry = results["models"][NAME]
    assert f"{entry['macs'] / 1e9:.3f}" in md and f"{2 * entry['macs'] / 1e9:.3f}" in md
    assert "## GPU\n\nNot measured: not requested (--devices cpu)" in md
    path = tmp_path / "bench.json"
    write_json(path, results)
    back = json.loads(path.read_text())
    assert back["models"][NAME]["macs"] == entry["macs"]
    assert back["models"][NAME]["latency"][0]["original_ms"] == pytest.approx(entry["latency"][0]["original_ms"])


def test_doc_keeps_hand_written_text(results, tmp_path):
    doc = tmp_path / "benchmarks.md"
    write_doc(doc, "first body")
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and BEGIN in text and END in text and "first body" in text
    doc.write_text(text.replace(END, END + "\n\n## Analysis\n\nwritten by hand\n").replace(
        "# Benchmarks", "# Benchmarks\n\nintro by hand"))
    write_doc(doc, render(results))
    text = doc.read_text()
    assert "first body" not in text and "intro by hand" in text and "written by hand" in text
    assert text.count(BEGIN) == 1 and "## Goals" in text


def test_doc_written_by_the_old_fxprune_bench_is_regenerated_in_place(tmp_path):
    begin, end = LEGACY_MARKERS[0]
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{begin}\n\nold numbers\n{end}\n\n## Analysis by hand\n")
    write_doc(doc, "new numbers")
    text = doc.read_text()
    assert "old numbers" not in text and begin not in text and end not in text
    assert text == f"# Benchmarks\n\nintro\n\n{BEGIN}\n\nnew numbers\n{END}\n\n## Analysis by hand\n"
    assert "python -m benches.harness" in BEGIN


def test_harness_lives_in_the_repository_not_the_package():
    assert importlib.util.find_spec("fxprune.bench") is None  # the installed package has no harness
    assert (REPO / "pyproject.toml").is_file() and (REPO / "benches" / "harness" / "cli.py").is_file()
    assert kernel_bench_file(REPO) == REPO / "benches" / "micro" / "bench_kernels.py"
    assert kernel_bench_file(REPO).is_file()


def test_torch_pruning_side_by_side(results):
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed: pip install 'fxprune[compare]'")
    entry = results["models"][NAME]
    assert results["torch_pruning"]["available"]
    tp = {(v["flops"], v["round_to"]): v for v in entry["variants"] if v["tool"] == "torch_pruning"}
    assert set(tp) == {(0.5, None), (0.5, 8)}
    for v in tp.values():
        assert v["ok"] and v["output_shapes_match"] and 0 < v["ratio"] < 1 and v["tries"] >= 1
        assert 0 < v["macs_fraction"] <= 0.5
        assert v["params"] < entry["params"]
    # the ratio search gets near the target (16-channel layers move the MACs in coarse steps)
    assert tp[(0.5, None)]["macs_fraction"] >= 0.45
    # Torch-Pruning's model is counted by the same counter, independently of the suite
    assert tp[(0.5, None)]["macs"] == pytest.approx(0.5 * entry["macs"], rel=0.02)
    peer = entry["compile"]["torch_pruning"]
    assert peer["total"] == pytest.approx(peer["dependency_graph"] + peer["step"])
    assert peer["ratio"] == tp[(0.5, None)]["ratio"]
    for x in entry["latency"]:
        assert "torch_pruning 0.5" in x["slim"] and "torch_pruning 0.5 r8" in x["slim"]
    h2h = entry["head_to_head"]  # the two slim models at 0.5, timed pair by pair at batch 2
    assert (h2h["flops"], h2h["batch"], h2h["pairs"], len(h2h["pairs_ms"])) == (0.5, 2, 3, 3)
    assert 0 < h2h["ratio_q1"] <= h2h["ratio_median"] <= h2h["ratio_q3"]
    assert h2h["warmup"] >= MIN_WARMUP and h2h["stable"] == (h2h["spread"] <= 0.2)
    assert h2h["macs_reduction"]["fxprune"] >= 2 and h2h["macs_reduction"]["torch_pruning"] >= 2
    md = render(results)
    assert "### Side by side" in md and "### Coverage" in md
    cov = next(g for g in results["goals"] if g["goal"].startswith("fxprune converts every model"))
    assert cov["met"] is True and "Torch-Pruning converts 1/1, fxprune 1/1" in cov["detail"]


def test_comparison_skipped_when_torch_pruning_missing(monkeypatch, tmp_path, capsys):
    """Through the command line, with another --root: the doc goes to <root>/docs/benchmarks.md and
    the recorded commit is that root's (none: it is no git checkout)."""
    _hide(monkeypatch, "torch_pruning")
    doc = tmp_path / "docs" / "benchmarks.md"
    rc = harness_main(["--models", SPEC, "--input-shape", f"{NAME}=1,1,16,16", "--flops", "0.5", "--round-to",
                       "none", "--batch", "1", "--threads", "1", "--devices", "cpu", "--compile-repeats", "1",
                       "--method-repeats", "1", "--repeats", "1", "--warmup", "0", "--no-plots",
                       "--root", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Torch-Pruning is not installed" in out and "pip install" in out
    res = json.loads(doc.with_suffix(".json").read_text())
    assert res["torch_pruning"]["available"] is False
    assert all(v["tool"] == "fxprune" for v in res["models"][NAME]["variants"])
    assert "torch_pruning" not in res["models"][NAME]["compile"]
    text = doc.read_text()
    assert "## fxprune vs Torch-Pruning\n\nSkipped: Torch-Pruning is not installed" in text
    assert "## Realized speedup" in text  # the rest of the tables are still there
    assert res["command"].startswith("python -m benches.harness --models fxprune:resnet20")
    assert res["machine"]["git_commit"] is None and res["json"] == "benchmarks.json"
    peer_goals = [g for g in res["goals"] if "Torch-Pruning" in g["goal"]]
    assert peer_goals and all(g["met"] is None for g in peer_goals)


def test_goals_judged_from_numbers():
    def lat(fx_eff, tp_eff):
        slim = {"fxprune 0.5": {"speedup": 2 * fx_eff, "macs_reduction": 2.0, "efficiency": fx_eff}}
        if tp_eff is not None:
            slim["torch_pruning 0.5"] = {"speedup": 2 * tp_eff, "macs_reduction": 2.0, "efficiency": tp_eff}
        return [{"device": "cpu", "dtype": "float32", "torch_compile": False, "batch": 32, "slim": slim}]

    def variants(fx_ok, tp_ok):
        return [{"tool": "fxprune", "ok": fx_ok, "error": None if fx_ok else "boom"},
                {"tool": "torch_pruning", "ok": tp_ok, "error": None if tp_ok else "ZeroDivisionError"}]

    res = {"models": {
        "resnet50": {"compile": {"compile_s": 0.2, "compile_with_method_s": 0.25, "torch_pruning": {"total": 0.7}},
                     "latency": lat(0.9, 0.88), "variants": variants(True, True)},
        "shufflenet": {"variants": variants(True, False)}}}
    met = [g["met"] for g in evaluate_goals(res)]
    assert met == [True, True, True, True, True]
    res["models"]["resnet50"]["compile"]["compile_s"] = 1.2  # too slow, and only 0.58x Torch-Pruning
    res["models"]["resnet50"]["latency"] = lat(0.8, 0.95)
    res["models"]["shufflenet"]["variants"] = variants(False, True)
    goals = evaluate_goals(res)
    assert [g["met"] for g in goals] == [False, False, False, False, False]
    assert "fxprune misses shufflenet" in goals[4]["detail"]
    assert [g["met"] for g in evaluate_goals({"models": {}})] == [None] * 5
    # with a pair-by-pair timing, the head-to-head goal is judged on it (within its own noise)
    h2h = {"flops": 0.5, "batch": 32, "pairs": 9, "macs_reduction": {"fxprune": 2.0, "torch_pruning": 2.0}}
    res["models"]["resnet50"]["head_to_head"] = dict(h2h, ratio_median=1.02, ratio_q1=0.97, ratio_q3=1.07)
    assert evaluate_goals(res)[3]["met"] is True and "pair by pair" in evaluate_goals(res)[3]["detail"]
    res["models"]["resnet50"]["head_to_head"] = dict(h2h, ratio_median=1.10, ratio_q1=1.09, ratio_q3=1.11)
    assert evaluate_goals(res)[3]["met"] is False


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as peak:
        x = torch.ones(16, 1024, 1024)  # 64 MiB
        del x
    assert peak.mib >= 60 and peak.method


def test_interleaved_latency():
    x = ExampleInputs.normalize(torch.randn(2, 8))
    small, big = nn.Linear(8, 4), nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)])
    big.train()
    ms = interleaved_latency_ms({"small": small, "big": big}, x, repeats=4, warmup=1)
    assert set(ms) == {"small", "big"}
    for v in ms.values():
        assert len(v["repeats_ms"]) == 4 and 0 < v["min_ms"] <= v["median_ms"]
    assert big.training  # the mode comes back
    with pytest.raises(ValueError):
        interleaved_latency_ms({"small": small}, x, repeats=0)


def test_paired_latency_ratio():
    x = ExampleInputs.normalize(torch.randn(2, 64))
    small = nn.Linear(64, 64)
    big = nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)]).train()
    r = paired_latency_ratio(small, big, x, pairs=5, warmup=1)
    assert len(r["pairs_ms"]) == 5 and all(a > 0 and b > 0 for a, b in r["pairs_ms"])
    assert r["ratio_q1"] <= r["ratio_median"] <= r["ratio_q3"] < 1  # 40 layers take longer than 1
    assert r["spread"] == pytest.approx((r["ratio_q3"] - r["ratio_q1"]) / r["ratio_median"])
    assert r["stable"] == (r["reason"] == "")
    assert big.training  # the mode comes back
    with pytest.raises(ValueError):
        paired_latency_ratio(small, big, x, pairs=0)


def test_bad_options_raise_config_errors():
    for bad in (dict(flops=(1.5,)), dict(round_to=(0,)), dict(batches=(0,)), dict(devices=("tpu",)),
                dict(dtypes=("int8",)), dict(latency_repeats=0), dict(models=[])):
        with pytest.raises(fxprune.ConfigError):
            tiny_config(**bad).validate()
    assert harness_main(["--round-to", "eight", "--doc", "/nonexistent/x.md"]) == 2
    assert harness_main(["--torch-compile", "maybe", "--doc", "/nonexistent/x.md"]) == 2


def test_cuda_skipped_with_message_without_gpu():
    status = cuda_status(("cpu", "cuda"))
    if torch.cuda.is_available():
        assert status["measured"]
    else:
        assert not status["measured"] and "still to be measured" in status["message"]
    assert cuda_status(("cpu",))["measured"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: CUDA events, bf16 and torch.compile")
def test_cuda_latency_bf16_and_compile():
    res = run_suite(tiny_config(round_to=(None,), batches=(2,), devices=("cuda",), compare=False,
                                dtypes=("float32", "bfloat16"), torch_compile=(False, True), cuda_latency_repeats=3),
                    log=lambda _: None)
    lat = res["models"][NAME]["latency"]
    assert {(x["dtype"], x["torch_compile"]) for x in lat} == {("float32", False), ("float32", True),
                                                               ("bfloat16", False), ("bfloat16", True)}
    for x in lat:
        assert "error" not in x, x.get("error")
        assert x["original_ms"] > 0 and all(s["ms"] > 0 for s in x["slim"].values())


def test_kernel_benchmarks_skip_with_message(tmp_path):
    res = run_kernel_benchmarks(bench_file=tmp_path / "bench_kernels.py")
    assert res["status"] == "skipped" and res["message"]


def test_kernel_benchmarks_run_from_the_given_root(tmp_path):
    """--kernels runs <root>/benches/micro/bench_kernels.py with pytest-benchmark in a child process."""
    pytest.importorskip("pytest_benchmark")
    bench = kernel_bench_file(tmp_path)
    bench.parent.mkdir(parents=True)
    bench.write_text("def test_noop(benchmark):\n    benchmark.extra_info['layer'] = 'tiny'\n"
                     "    benchmark(sum, range(10))\n")
    res = run_kernel_benchmarks(root=tmp_path, timeout_s=120)
    assert res["status"] == "ok", res
    assert res["command"] == "python -m pytest benches/micro/bench_kernels.py --benchmark-only"
    (row,) = res["benchmarks"]
    assert row["name"] == "test_noop" and row["extra"] == "layer=tiny" and 0 < row["min_ms"] <= row["median_ms"]


def test_plots_optional(results, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install 'fxprune[plots]'")
    paths, message = write_plots(results, tmp_path)
    assert paths and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert any("latency_vs_macs" in p.name for p in paths)
    _hide(monkeypatch, "matplotlib")
    paths, message = write_plots(results, tmp_path / "none")
    assert paths == [] and "matplotlib is not installed" in message
    assert "## Realized speedup" in render(results)  # the tables need no matplotlib


def test_metrics_count_slim_models():
    model = build_model(SPEC).eval()
    x = example_input(SHAPE)
    slim = fxprune.compress(model, "l1", x, 0.5)
    assert count_macs(slim, x) == slim.fxprune_report.macs_after
    assert count_params(slim) == slim.fxprune_report.params_after
    assert math.isclose(count_macs(model, x), slim.fxprune_report.macs_before)


def test_merge_keeps_models_of_the_earlier_run(results):
    old = json.loads(json.dumps(results, default=str))
    old["models"]["other"] = dict(old["models"][NAME], spec="torchvision:other")
    new = json.loads(json.dumps(results, default=str))
    new["models"][NAME]["macs"] += 1  # re-measured
    new["command"] = "python -m benches.harness --models fxprune:resnet20 --merge"
    merged = merge_results(old, new)
    assert list(merged["models"]) == [NAME, "other"]
    assert merged["models"][NAME]["macs"] == results["models"][NAME]["macs"] + 1
    assert [r["models"] for r in merged["runs"]] == [["other"], [NAME]]  # the runs numbers come from
    again = merge_results(merged, dict(new, models={**new["models"], "other": old["models"]["other"]}))
    assert [r["models"] for r in again["runs"]] == [[NAME, "other"]]  # an earlier run no number comes from goes
    assert set(merged["coverage"]) == {NAME, "other"}
    assert "each model's numbers are from the last run" in render(merged)


def test_steady_heap_applies_while_timing(results):
    with steady_heap() as applied:
        x = torch.ones(8, 1024, 1024)  # 32 MiB: from the heap while it applies
        del x
    assert applied == (_glibc() is not None)
    assert all(lat["steady_heap"] == applied for lat in results["models"][NAME]["latency"])
    assert ("reused heap memory" in render(results)) == applied


# the package's generic `fxprune bench MODEL`: compress, then original vs slim side by side

def _stable_clock(ms: float):
    return lambda: ms  # every call the same: a stable latency


def test_fxprune_bench_table_and_json(tmp_path, capsys, monkeypatch):
    """lenet5 at two batch sizes with an injected clock (original 10 ms, slim 4 ms per call): the table has
    separate labelled MACs and FLOPs columns and the setting; the JSON's FLOPs are 2 x its MACs, which
    match an independent count; the speedup is the ratio of the two medians."""
    seen = []

    def fake_measure(models, inputs, measurer):
        seen.append((sorted(models), inputs.args[0].shape[0], measurer.repeats, measurer.warmup_calls(0)))
        return measurer.measure({"original": _stable_clock(10.0), "slim": _stable_clock(4.0)})

    monkeypatch.setattr(generic_bench, "measure_latencies", fake_measure)
    threads_before = torch.get_num_threads()
    out = tmp_path / "bench.json"
    rc = main(["bench", "fxprune:lenet5", "--method", "l1", "--flops", "0.5", "--batch", "1,2", "--threads", "1",
               "--repeats", "3", "--json", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads_before  # the run's thread count is undone
    assert seen == [(["original", "slim"], 1, 3, MIN_WARMUP), (["original", "slim"], 2, 3, MIN_WARMUP)]
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["model", "variant", "device", "threads", "batch", "dtype", "params", "MACs/image",
                     "FLOPs/image", "latency (median)", "speedup"]
    res = json.loads(out.read_text())
    assert (res["device"], res["threads"], res["dtype"], res["method"], res["flops_target"]) == (
        "cpu", 1, "float32", "l1", 0.5)
    assert res["command"] == f"fxprune bench fxprune:lenet5 --method l1 --flops 0.5 --batch 1,2 --threads 1 " \
                            f"--repeats 3 --json {out}"
    (m,) = res["models"]
    model = build_model("fxprune:lenet5").eval()
    assert m["macs"]["original"] == measured_macs(model, example_input((1, 1, 28, 28)))
    assert m["params"]["original"] == sum(p.numel() for p in model.parameters()) > m["params"]["slim"]
    for variant in ("original", "slim"):
        assert m["flops"][variant] == 2 * m["macs"][variant] > 0
    assert m["macs"]["slim"] <= 0.5 * m["macs"]["original"]
    assert [lat["batch"] for lat in m["latency"]] == [1, 2]
    for lat in m["latency"]:
        assert lat["stable"] and lat["speedup"] == pytest.approx(2.5)
        assert lat["original"]["median_ms"] == 10.0 and lat["slim"]["median_ms"] == 4.0
    rows = [line for line in text.splitlines() if "| slim " in line]
    assert len(rows) == 2 and all(r.rstrip(" |").endswith("2.50x") and "4.00 ms" in r for r in rows)
    first = next(line for line in text.splitlines() if line.startswith("| fxprune:lenet5"))
    row = [c.strip() for c in first.strip("|").split("|")]
    assert row[2:6] == ["cpu", "1", "1", "float32"]
    assert row[7:9] == [fxprune.report.human(m["macs"]["original"]), fxprune.report.human(m["flops"]["original"])]


def test_fxprune_bench_times_real_models():
    """No injected clock: both models are really run, and a speedup exists exactly when both latencies
    are stable."""
    res = generic_bench.bench_models(["fxprune:lenet5"], batches=(2,), threads=1, repeats=3)
    lat = res["models"][0]["latency"][0]
    assert lat["original"]["n"] == lat["slim"]["n"] == 3 and len(lat["slim"]["warmup_ms"]) >= MIN_WARMUP
    assert 0 < lat["original"]["min_ms"] <= lat["original"]["median_ms"]
    if lat["original"]["stable"] and lat["slim"]["stable"]:
        assert lat["speedup"] == pytest.approx(lat["original"]["median_ms"] / lat["slim"]["median_ms"])
    else:
        assert lat["speedup"] is None and lat["reason"]


def test_fxprune_bench_points_old_suite_options_to_the_harness(tmp_path, capsys):
    doc = tmp_path / "bench.md"
    assert main(["bench", "--models", "resnet18", "--doc", str(doc), "--merge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python -m benches.harness" in err
    assert all(flag in err.split(":")[1] for flag in ("--models", "--doc", "--merge"))
    assert not doc.exists() and not doc.with_suffix(".json").exists()
    assert main(["bench"]) == 2  # the old default run of the whole suite
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python -m benches.harness" in err
    assert main(["bench", "fxprune:lenet5", "--input-shape", "lenet5=1,1,28,28"]) == 2
    assert "python -m benches.harness" in capsys.readouterr().err
    for bad in (["--batch", "0"], ["--flops", "1.5"], ["--repeats", "0"], ["--round-to", "eight"]):
        assert main(["bench", "fxprune:lenet5", *bad]) == 2
        assert capsys.readouterr().err.startswith("fxprune: error:")
