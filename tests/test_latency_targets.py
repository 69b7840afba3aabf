"""Latency targets through the whole pipeline, measured for real on this CPU (tiny models, so the
profiles take a second or two): compress meets a measured latency target or raises with the best
value, round_to="auto" lands on step edges within the FLOPs budget, the report and the CLI show
predicted and measured latency, and methods that cannot honour a latency target refuse it."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision

import fxprune
from fxprune.methods.latency_selection import SPEED_MIN_RATIO
from fxprune.cli import main
from fxprune.latency_model import profile_latency

from .handler_models import ResidualClassifier


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path / "cache"))


def _flop_clock(fns, s, measurer):
    """A deterministic stand-in for `profile._round_robin`: each call "takes" 10 us plus 1 ps per
    FLOP it runs (counted by FlopCounterMode), so the profile, the fit and every end-to-end
    measurement see a machine whose time is exactly its FLOPs. What the tests below check is the
    methods' loop around the measurements, which a real 2.5 ms timing on a shared CPU made flaky."""
    from torch.utils.flop_counter import FlopCounterMode

    out = []
    with torch.inference_mode():
        for fn in fns:
            with FlopCounterMode(display=False) as counter:
                fn()
            out.append(1e-5 + 1e-12 * counter.get_total_flops())
    return out, True


@pytest.fixture(params=["flop_clock", pytest.param("real_clock", marks=pytest.mark.timing)])
def clock(request, monkeypatch):
    """The GD / GAL / CLI latency-target tests run by default on the FLOP clock (deterministic: a
    measured target on a loaded CI machine failed them, best measured 1.24 of the original) and,
    with ``-m timing``, on the real one."""
    if request.param == "flop_clock":
        from fxprune.latency_model import profile

        monkeypatch.setattr(profile, "_round_robin", _flop_clock)
    return request.param


def _check_flop_clock(clock, model, slim, x, lat) -> None:
    """On the FLOP clock the numbers are known exactly: before / after are the original's and the
    slim model's FLOP times (so the target is judged on the model returned), and the latency model,
    fitted on the same clock, predicts the slim model's time."""
    if clock != "flop_clock":
        return
    (orig_s,), _ = _flop_clock([lambda: model(x)], None, None)
    (slim_s,), _ = _flop_clock([lambda: slim(x)], None, None)
    assert lat["measured_before_s"] == pytest.approx(orig_s, rel=1e-9)
    assert lat["measured_after_s"] == pytest.approx(slim_s, rel=1e-9)
    assert lat["predicted_after_s"] == pytest.approx(slim_s, rel=1e-3)


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval(), torch.randn(1, 3, 64, 64)


def test_a_measured_latency_target_is_met():
    model, x = _resnet18()
    slim = fxprune.compress(model, "l1", x, 1.0, latency=0.7, batch=4)
    lat = slim.fxprune_report.details["latency"]
    assert lat["target_s"] == pytest.approx(0.7 * lat["measured_before_s"])
    assert lat["measured_after_s"] <= lat["target_s"]  # measured end to end, not only predicted
    assert lat["predicted_after_s"] <= lat["rounds"][-1]["budget_s"] * (1 + 1e-9)
    assert slim.fxprune_report.max_rel_error < 1e-4
    table = slim.fxprune_report.table()
    assert "latency measured (ms, cpu, batch 4" in table and "latency predicted" in table


def test_an_unreachable_latency_raises_with_the_best_value():
    model, x = _resnet18()
    with pytest.raises(fxprune.LatencyUnreachableError) as info:
        fxprune.compress(model, "l1", x, 1.0, latency=0.01, batch=4)
    assert info.value.best_s > info.value.target_s > 0 and "ms" in str(info.value)


def test_round_to_auto_lands_on_step_edges_within_the_flops_budget():
    model, x = _resnet18()
    analysis = fxprune.analyze(model, x)
    latency_model = profile_latency(analysis, batch=4)
    slim = fxprune.compress(model, "l1", x, 0.5, round_to="auto", batch=4)
    report = slim.fxprune_report
    assert report.macs_after <= 0.5 * report.macs_before * (1 + 1e-9)
    kept = {int(g): len(units) for g, units in slim.fxprune_recipe["plan"]["keep"].items()}
    for group, count in kept.items():
        n_units = analysis.channels.groups[group].n_units
        edges = set(int(e) for e in latency_model.group_steps(group))
        speed_floor = max(1, math.ceil(SPEED_MIN_RATIO * n_units))  # the speed plans' rule minimum
        assert count in edges or count in (n_units, 1, speed_floor), (group, count, sorted(edges))
    assert report.details["latency"]["measured_after_s"] > 0


def test_gate_decorator_stops_ticking_under_a_measured_latency(clock):
    # real_clock: a 2.5 ms model; its measured latency under pruning varies run to run (failed twice in CI)
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 48, 48, generator=g), torch.randint(0, 4, (16,), generator=g)),
                      batch_size=8)  # big enough images that compute, not call overhead, sets the latency
    model, x = ResidualClassifier().eval(), torch.randn(8, 3, 48, 48)
    slim = fxprune.compress(model, "gate_decorator", x, 1.0,
                            latency=0.85, data=data, options=dict(schedule="one_shot", finetune_epochs=0))
    lat = slim.fxprune_report.details["latency"]
    assert lat["measured_after_s"] <= lat["target_s"]
    _check_flop_clock(clock, model, slim, x, lat)


def test_gate_decorator_ticks_that_run_out_raise_a_latency_error_with_the_best_value(monkeypatch):
    """Tick-Tock under a latency no plan reaches (FLOP clock): the Ticks end with every group at
    its 10 % minimum, and the user who asked for a latency gets LatencyUnreachableError (best value,
    of the original, every measured check), not a FLOPs error about flops=1.0."""
    from torch.utils.data import DataLoader, TensorDataset

    from fxprune.latency_model import profile

    monkeypatch.setattr(profile, "_round_robin", _flop_clock)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)),
                      batch_size=8)
    model, x = ResidualClassifier().eval(), torch.randn(8, 3, 32, 32)
    with pytest.raises(fxprune.LatencyUnreachableError) as info:
        fxprune.compress(model, "gate_decorator", x, 1.0, latency=0.02, data=data,
                         options=dict(schedule="tick_tock", p=0.5, T=100, tock_epochs=1, finetune_epochs=0))
    err = info.value
    assert err.best_s > err.target_s > 0 and err.original_s > err.target_s
    assert "Gate Decorator's Ticks ended" in str(err) and "flops=" not in str(err)
    assert err.measured == (err.best_measured_s is not None)


def test_gal_thresholds_its_masks_until_measured_under_the_target(clock):
    # real_clock: the same 2.5 ms model; its profile's floor came out at 0.95 of the original once in CI
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 48, 48, generator=g)), batch_size=8)  # label-free
    model, x = ResidualClassifier().eval(), torch.randn(8, 3, 48, 48)
    slim = fxprune.compress(model, "gal", x, 1.0, latency=0.8, data=data,
                            options=dict(structures=("channel",), epochs=1, mask_step=1))
    report = slim.fxprune_report
    lat = report.details["latency"]
    assert lat["measured_after_s"] <= lat["target_s"] == pytest.approx(0.8 * lat["measured_before_s"])
    _check_flop_clock(clock, model, slim, x, lat)
    assert report.details["reached_by"].endswith("then the latency fit")
    assert report.macs_after < report.macs_before and report.max_rel_error < 1e-4


def test_a_method_without_a_latency_target_refuses_it():
    """Every built-in method honours latency=; a method that does not declare it is refused by name."""
    from fxprune.methods import METHODS, MethodResult, register_method
    from fxprune.passes.plan import PruningPlan

    class KeepAll:
        name, options_type, supports, needs_data = "keep_all", None, frozenset({"round_to"}), False

        def run(self, ctx):
            return MethodResult(PruningPlan())

    register_method(KeepAll())
    try:
        with pytest.raises(fxprune.ConfigError, match="'keep_all' does not support latency"):
            fxprune.compress(ResidualClassifier().eval(), "keep_all", torch.randn(2, 3, 8, 8), 1.0, latency=0.5)
    finally:
        METHODS.pop("keep_all")
    assert all("latency" in m.supports for m in METHODS.values())


def test_cli_profile_and_latency_compress(capsys, tmp_path, clock):
    args = ["torchvision:resnet18", "--input-shape", "1,3,64,64", "--batch", "4"]
    assert main(["profile", *args, "--limit", "3", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "step edges" in out and "original measured" in out and (tmp_path / "p.json").exists()
    assert main(["profile", *args, "--limit", "3"]) == 0
    assert "loaded from the cache" in capsys.readouterr().out
    assert main(["compress", *args, "--flops", "1", "--latency", "0.8"]) == 0
    assert "latency measured" in capsys.readouterr().out
    assert main(["compress", *args, "--round-to", "auto"]) == 0
    assert "latency predicted" in capsys.readouterr().out


def test_bench_with_a_latency_target_and_round_to_auto(tmp_path, capsys, clock):
    import json

    out = tmp_path / "b.json"
    args = ["bench", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--batch", "2", "--repeats", "3"]
    assert main([*args, "--flops", "1", "--latency", "0.8", "--json", str(out)]) == 0
    entry = json.loads(out.read_text())["models"][0]
    assert entry["latency_target"]["measured_after_s"] <= entry["latency_target"]["target_s"]
    assert "latency target 0.8 of the original" in capsys.readouterr().out
    assert main([*args, "--round-to", "auto", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["round_to"] == "auto" and result["models"][0]["macs"]["slim"] <= 0.5 * result["models"][0]["macs"][
        "original"] * (1 + 1e-9)


def test_a_fraction_target_is_judged_on_the_ratio_measured_now(monkeypatch):
    """The slim model is timed side by side with the original and scaled to the profile's original:
    a machine twice as busy as when the profile was taken changes nothing."""
    from types import SimpleNamespace

    from fxprune.constraints import Constraints, MeasureOn
    from fxprune.methods import latency_target
    from fxprune.passes.plan import PruningPlan

    model, x = _resnet18()
    analysis = fxprune.analyze(model, x)
    seen = []

    def fake_measure_models(models, inputs, **how):
        seen.append(len(models))
        return [2.0, 8.0]  # slim 2 s, original 8 s now (the profile said 4 s)

    monkeypatch.setattr(latency_target, "measure_models", fake_measure_models)
    monkeypatch.setattr(latency_target, "measure_model", lambda *a, **k: 3.0)
    profile = SimpleNamespace(original_s=4.0)
    for constraints, expected in ((Constraints(flops=1.0, latency=0.5), 1.0), (Constraints(flops=1.0, latency_ms=5.0), 3.0)):
        context = SimpleNamespace(analysis=analysis, constraints=constraints, measure_on=MeasureOn())
        assert latency_target.slim_latency(context, PruningPlan(), profile) == expected
    assert seen == [2]


def test_blocks_through_compress_and_the_cli(tmp_path, capsys, clock):
    """blocks=True end to end: the target is met as measured, the report lists the removed blocks
    (verified against the masked original by compress), and `fxprune bench --blocks` records it."""
    import json

    model, x = _resnet18()
    slim = fxprune.compress(model, "l1", x, flops=1.0, latency=0.5, blocks=True, batch=2)
    lat = slim.fxprune_report.details["latency"]
    assert lat["measured_after_s"] <= lat["target_s"] and isinstance(lat["removed_blocks"], list)
    adds = {br.add for br in fxprune.analyze(model, x).channels.structures.residual_branches}
    assert set(lat["removed_blocks"]) <= adds
    assert not set(lat["removed_blocks"]) & {n.name for n in slim.graph.nodes}  # gone from the slim graph
    out = tmp_path / "b.json"
    args = ["bench", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--batch", "2", "--repeats", "3"]
    assert main([*args, "--flops", "1", "--latency", "0.5", "--blocks", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["blocks"] is True
    assert "(whole residual blocks may go)" in capsys.readouterr().out
