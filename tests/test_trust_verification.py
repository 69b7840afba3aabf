"""Verification that cannot be fooled, and arguments checked at the door (issue 13's probes 2, 9, 13).

Every case reproduces a probe: a NaN planted in the slim model, a half-precision original that
overflows, a hook on the root module, a string `ignore`, misspelt names, raw tracebacks for wrong
argument types and impossible inputs.
"""
from __future__ import annotations

import pytest
import torch
from fxprune.passes.inputs import ExampleInputs
from fxprune.passes.mask import masked_reference
from torch import nn

import fxprune
from fxprune import api
from fxprune.constraints import Constraints
from fxprune.methods import MethodContext, get_method
from fxprune.verify import compare, verify

from .conftest import outputs


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _slim_and_reference(model, x, flops=0.5):
    analysis = fxprune.analyze(model, x)
    plan = get_method("l1").run(MethodContext(analysis, Constraints(flops=flops), None)).plan
    slim, _ = fxprune.prune_with_plan(analysis, plan, verify_output=False)
    return slim, masked_reference(analysis.channels, plan), analysis.inputs


def test_a_nan_in_the_slim_model_fails_verification():
    slim, ref, inputs = _slim_and_reference(Net().eval(), X)
    assert verify(ref, slim, inputs).max_rel_error < 1e-5
    with torch.no_grad():
        slim.get_submodule("body.3").weight[0, 0, 0, 0] = float("nan")
    result = compare(ref, slim, inputs)
    assert not result.passed and "non-finite values differ" in result.worst_output
    with pytest.raises(fxprune.VerificationError, match="non-finite values differ: 0 in the reference"):
        verify(ref, slim, inputs)


def test_a_nan_planted_by_the_rewrite_fails_compress(monkeypatch):
    real = api.apply_plan

    def poisoned(channels, plan):
        slim = real(channels, plan)
        with torch.no_grad():
            next(p for p in slim.parameters() if p.ndim == 4)[0, 0, 0, 0] = float("nan")
        return slim

    monkeypatch.setattr(api, "apply_plan", poisoned)
    with pytest.raises(fxprune.VerificationError, match="non-finite"):
        fxprune.compress(Net().eval(), "l1", X, 0.5)


def test_same_non_finite_values_in_both_are_compared_elsewhere():
    a, b = torch.tensor([1.0, float("nan"), float("inf"), 2.0]), torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    ref, slim = nn.Identity(), nn.Identity()
    ex = ExampleInputs((a,), {})
    from fxprune.verify import _leaf_error

    assert _leaf_error(a, b)[1] == 0.0
    assert _leaf_error(a, torch.tensor([1.0, float("nan"), float("-inf"), 2.0]))[1] == float("inf")
    assert _leaf_error(a, torch.tensor([1.5, float("nan"), float("inf"), 2.0]))[1] == pytest.approx(0.25)
    assert _leaf_error(torch.full((3,), float("nan")), torch.full((3,), float("nan")))[1] == float("inf")
    assert compare(ref, slim, ex).passed


def _overflowing_half_model():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.body[3].weight.mul_(100)  # activations, not weights, overflow: float16 tops out at 65504
        model.head.weight.fill_(2000.0)
    return model.half()


def test_an_overflowing_half_original_is_rechecked_in_float32():
    model = _overflowing_half_model()
    x = torch.randn(2, 3, 8, 8).half()
    assert not torch.isfinite(model(x)).all()
    slim, ref, inputs = _slim_and_reference(model, x)
    result = compare(ref, slim, inputs)
    assert result.passed and "re-checked in float32" in result.worst_output
    assert slim.get_submodule("head").weight.dtype == torch.float16  # the copies were converted, not the models
    with torch.no_grad():
        slim.get_submodule("head").bias.add_(1e3)  # wrong, but invisible under the fp16 overflow
    slim_out = outputs(slim, inputs.args)[0][1]
    assert not torch.isfinite(slim_out).all()
    with pytest.raises(fxprune.VerificationError, match="re-checked in float32"):
        verify(ref, slim, inputs)


def test_root_hooks_are_carried_onto_the_slim_model():
    model = Net().eval()
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_hook(lambda m, args, out: out * 3 + 1)
    model.body[0].register_forward_hook(lambda m, args, out: out.relu())  # a leaf's own hook
    slim = fxprune.compress(model, "l1", X, 1.0)
    with torch.no_grad():
        assert torch.allclose(slim(X), model(X), rtol=1e-5, atol=1e-5)  # 241 % off before the fix
    slim = fxprune.compress(model, "l1", X, 0.5)  # verified against the hooked masked original
    assert slim.fxprune_report.max_rel_error < 1e-5
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1  # the user's model untouched


def test_ignore_given_as_one_string_is_one_name():
    slim = fxprune.compress(Net().eval(), "l1", X, 0.7, ignore="head")
    assert slim.get_submodule("body.3").out_channels == 16
    assert slim.get_submodule("body.0").out_channels < 16


@pytest.mark.parametrize("kwargs, message", [
    ({"ignore": "bdy.3"}, r"ignore: no module of Net is named 'bdy.3'; did you mean 'body.3'"),
    ({"ignore": ["body.*.conv"]}, r"no module of Net is named 'body.\*.conv'"),
    ({"leaf_modules": ["body.9"]}, r"leaf_modules: no module of Net is named 'body.9'"),
    ({"leaf_modules": [123]}, r"leaf_modules entries must be module names or types; got 123"),
    ({"leaf_modules": [nn.Sequential()]}, "leaf_modules entries must be module names or types"),
    ({"ignore": [nn.Conv2d(1, 1, 1)]}, "instance is not a submodule of the model"),
    ({"ignore": [int]}, "int is not an nn.Module subclass"),
    ({"min_ratio": "a"}, r"min_ratio='a' must be a number in \[0, 1\)"),
    ({"min_ratio": float("nan")}, "min_ratio=nan must be a number"),
    ({"min_channels": 2.5}, "min_channels=2.5 must be an integer >= 1"),
    ({"round_to": True}, "round_to=True must be an integer >= 1 or None"),
    ({"flops": "0.5"}, r"flops='0.5' must be the fraction of the original FLOPs to keep, in \(0, 1\]"),
    ({"concrete_args": [1]}, "concrete_args must be a dict"),
    ({"method": None}, "unknown method None"),
])
def test_bad_arguments_are_typed_errors(kwargs, message):
    args = {"method": "l1", "example_inputs": X, "flops": 0.5, **kwargs}
    with pytest.raises(fxprune.ConfigError, match=message):
        fxprune.compress(Net().eval(), **args)


@pytest.mark.parametrize("x, message", [
    (torch.randn(0, 3, 8, 8), r"shape \(0, 3, 8, 8\), with no elements: pass at least one sample"),
    (torch.randn(1, 3, 8, 8, device="meta"), "is on the meta device and has no values"),
    ({1: torch.randn(1, 3, 8, 8)}, "must map forward-argument names"),
])
def test_impossible_example_inputs_are_input_errors(x, message):
    with pytest.raises(fxprune.InputError, match=message):
        fxprune.compress(Net().eval(), "l1", x, 0.5)


@pytest.mark.parametrize("data", [[], iter([])])
def test_gal_with_empty_data(data):
    from fxprune.train import TrainingError

    with pytest.raises(TrainingError, match="GAL data is empty"):
        fxprune.compress(Net().eval(), "gal", X, 0.5, data=data)


def test_data_driven_artifacts_keep_the_model_spec(tmp_path):
    from fxprune.models import build_model

    model = build_model("fxprune:lenet5").eval()
    x = torch.randn(4, 1, 28, 28)
    data = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(2)]
    slim = fxprune.compress(model, "gate_decorator", x, 0.7, data=data,
                            options=dict(schedule="one_shot", finetune_epochs=0))
    assert slim.fxprune_recipe["base"]["spec"] == "fxprune:lenet5"


def test_cli_never_downloads(monkeypatch, capsys):
    import torch.hub

    def refuse(*_a, **_k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    from fxprune.cli import main

    assert main(["inspect", "torchvision:lraspp_mobilenet_v3_large", "--limit", "1"]) == 0
    assert "groups prunable" in capsys.readouterr().out
    from fxprune.models import build_model

    assert type(build_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")).__name__ == "FasterRCNN"
    with pytest.raises(fxprune.ConfigError, match="weights must be None/False"):
        build_model("torchvision:resnet18", weights="IMAGENET1K_V1")


def test_verification_error_says_relative():
    err = fxprune.VerificationError(0.5, 1e-4, "output")
    assert "relative to the output's magnitude 5.000e-01" in str(err) and err.max_rel_error == 0.5
