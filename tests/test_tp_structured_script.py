"""benches/experiments/tp_structured.py: fxprune (grouped="auto") and Torch-Pruning side by side at half
the MACs, with the share of fxprune's cut from structured channel groups.

Quick mode only (64x64 inputs, one thread): the script's --quick run on regnet_x_400mf through its child
processes (JSON and Markdown written, both tools near 0.5 of the MACs, the structured share consistent),
a Torch-Pruning failure recorded as "not converted" with the exception (shufflenet_v2_x0_5's channel
shuffle), and a child past its timeout killed and recorded. No timing is asserted.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from benches.experiments import tp_structured

pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed: pip install 'fxprune[compare]'")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_structured")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = tp_structured.main(["--quick", "--models", "regnet_x_400mf", "--json", str(out / "r.json"),
                                 "--md", str(out / "r.md")])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def test_quick_run_both_tools_near_half_the_macs(quick):
    results, _ = quick
    e = results["models"]["regnet_x_400mf"]
    assert e["input"] == [1, 3, 64, 64] and e["macs"] > 0 and e["params"] > 0
    fx, tp = e["fxprune"], e["torch_pruning"]
    assert fx["converted"], fx.get("error")
    assert fx["macs_before"] == e["macs"] and 0.49 <= fx["macs_fraction"] <= 0.5
    assert fx["macs_after"] == fx["cost_macs_after"]  # the counter and the cost model agree
    assert 0 <= fx["max_rel_error"] < 1e-4 and fx["params_after"] < fx["params_before"] and fx["seconds"] > 0
    assert tp["converted"], tp.get("error")
    assert tp["macs_before"] == e["macs"] and abs(tp["macs_fraction"] - 0.5) <= 0.01 and tp["in_band"]
    assert tp["output_finite"] and tp["output_shape_ok"] and tp["global_pruning"] is False
    assert 1 <= len(tp["tries"]) <= 8 and tp["pruning_ratio"] == pytest.approx(tp["tries"][-1][0], abs=1e-4)
    assert tp["params_after"] < tp["params_before"]


def test_quick_run_structured_share(quick):
    results, _ = quick
    st = results["models"]["regnet_x_400mf"]["fxprune"]["structures"]
    assert "error" not in st, st
    # the plan's whole drop is the report's; structured groups alone remove less, and something
    assert st["macs_removed"] == pytest.approx(st["macs_total"] - results["models"]["regnet_x_400mf"]["fxprune"]["cost_macs_after"])
    assert 0 < st["macs_removed_structured"] <= st["macs_removed"]
    assert st["share_structured_pct"] == pytest.approx(100 * st["macs_removed_structured"] / st["macs_removed"])
    assert 0 < st["groups_pruned_structured"] <= st["groups_pruned"] <= st["groups_prunable"]
    assert set(st["kinds"]) == {"grouped_equal"}  # RegNet: grouped convs only, equal positions under "auto"
    assert st["kinds"]["grouped_equal"]["macs_removed"] == pytest.approx(st["macs_removed_structured"])


def test_quick_run_markdown(quick):
    results, md = quick
    assert tp_structured.summary(results) in md
    assert re.search(r"fxprune converts 1 of 1; TP converts 1 of 1; models fxprune converts and TP does not: none; "
                     r"the reverse: none", md)
    row = next(line for line in md.splitlines() if line.startswith("| regnet_x_400mf |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(tp_structured.HEAD)
    fx = results["models"]["regnet_x_400mf"]["fxprune"]
    assert cells[4] == "yes" and cells[5] == f"{fx['macs_fraction']:.4f}" and cells[8] == "yes"
    assert results["runs"] and results["setting"]["versions"]["torch_pruning"]


def test_torch_pruning_failure_is_not_converted():
    # Torch-Pruning 1.6.1 cannot build ShuffleNetV2's dependency graph (channel shuffle)
    torch.set_num_threads(1)
    r = tp_structured.measure("shufflenet_v2_x0_5", "torch_pruning", size=64)["torch_pruning"]
    if r["converted"]:  # a later version prunes it: then it must be a working model at the target
        assert abs(r["macs_fraction"] - 0.5) <= 0.01 and r["output_finite"]
    else:
        assert re.match(r"[A-Za-z]+(Error|Exception)?: ", r["error"]) or r["error"].startswith("no pruning_ratio")


def test_child_past_its_timeout_is_killed_and_recorded(tmp_path):
    args = tp_structured.parse(["--quick", "--timeout", "1"])
    r = tp_structured.run_child("regnet_x_400mf", "fxprune", args, tmp_path)["fxprune"]
    assert not r["converted"] and r["error"].startswith("Timeout: killed after 1 s") and r["wall_s"] < 30
