"""Cost model against FlopCounterMode, and the command line."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune
from fxprune.cli import main

from .conftest import measured_macs, n_params
from .handler_models import HANDLER_MODELS


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "vit_b_32", "swin_t"])
def test_cost_model_matches_flop_counter(name):
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    a = fxprune.analyze(model, x)
    assert a.cost.total_macs == measured_macs(model, x)
    assert a.cost.total_params == n_params(model)


@pytest.mark.parametrize("name", sorted(HANDLER_MODELS))
def test_cost_model_matches_flop_counter_on_handler_models(name):
    build, shape = HANDLER_MODELS[name]
    model, x = build().eval(), torch.randn(shape)
    assert fxprune.analyze(model, x).cost.total_macs == measured_macs(model, x)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_vectorised_recount_equals_the_per_node_product(name):
    """`CostModel.macs/params` (vectorised) against the definition: per node, base x the kept
    fraction of each slot, summed; with nodes/parameters removed too."""
    import numpy as np

    model = torchvision.models.get_model(name).eval()
    cost = fxprune.analyze(model, torch.randn(1, 3, 64, 64)).cost
    rng = np.random.default_rng(0)
    gone_nodes = frozenset(list(cost.node_macs)[1::7])
    gone_params = frozenset(cost.param_owner[2::5])
    for _ in range(4):
        keep = rng.random(len(cost.channels.root)) > rng.random()
        by_node = [(n, cost._value(s, keep)) for n, s in cost.node_macs.items()]
        by_param = [(n, cost._value(s, keep)) for n, s in zip(cost.param_owner, cost.param_sizes)]
        assert cost.macs(keep) == pytest.approx(sum(v for _, v in by_node), rel=1e-12)
        assert cost.params(keep) == pytest.approx(sum(v for _, v in by_param), rel=1e-12)
        assert cost.macs(keep, gone_nodes) == pytest.approx(sum(v for n, v in by_node if n not in gone_nodes),
                                                            rel=1e-12)
        assert cost.params(keep, gone_params) == pytest.approx(
            sum(v for n, v in by_param if n not in gone_params), rel=1e-12)
    assert cost.macs() == cost.total_macs and cost.params() == cost.total_params


def test_report_labels_macs_and_flops_separately():
    slim = fxprune.compress(torchvision.models.resnet18().eval(), "l1", torch.randn(1, 3, 64, 64), 0.5)
    r = slim.fxprune_report
    assert r.flops_before == 2 * r.macs_before and r.flops_after == 2 * r.macs_after
    text = r.table()
    assert "| MACs" in text and "| FLOPs (2xMACs)" in text and "max error" in text


def test_cli_compress_prints_before_after_table(capsys):
    assert main(["compress", "torchvision:resnet18", "--flops", "0.5", "--input-shape", "1,3,64,64",
                 "--round-to", "4"]) == 0
    out = capsys.readouterr().out
    assert "torchvision:resnet18: l1 at flops=0.5" in out
    assert "| params" in out and "| MACs" in out and "FLOPs (2xMACs)" in out and "max error" in out


def test_cli_inspect_lists_groups_and_boundaries(capsys):
    # (ShuffleNetV2's channel shuffle is no boundary since issue 17: ConvNeXt's LayerNorm still is one)
    assert main(["inspect", "torchvision:convnext_tiny", "--input-shape", "1,3,64,64", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "why not prunable" in out and "LayerNorm normalises over the channel dim" in out and "MACs" in out


@pytest.mark.parametrize("argv,message", [
    (["inspect", "torchvision:not_a_model"], "torchvision has no model named 'not_a_model'"),
    (["inspect", "resnet50"], "must look like 'torchvision:resnet50'"),
    (["compress", "torchvision:resnet18", "--flops", "2"], "must be the fraction"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,x"], "comma-separated integers"),
    (["compress", "torchvision:resnet18", "--input-shape", "1,4,32,32"], "do not fit the model"),
])
def test_cli_errors_exit_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_user_factory(capsys):
    assert main(["compress", "tests.handler_models:Residual", "--input-shape", "1,3,8,8", "--flops", "0.6"]) == 0
    assert "Residual" not in capsys.readouterr().err
