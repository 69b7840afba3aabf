"""Bad input gets a typed error whose message names the problem and the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune

from .handler_models import Residual


def _x():
    return torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize("method", ["L1", "GAL", "magnitude", "", None])
def test_unknown_method(method):
    with pytest.raises(fxprune.ConfigError, match="unknown method .* choose one of l1, l2"):
        fxprune.compress(Residual(), method, _x(), 0.5)


@pytest.mark.parametrize("flops", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_flops_outside_unit_interval(flops):
    with pytest.raises(fxprune.ConfigError, match=r"must be the fraction .* in \(0, 1\]"):
        fxprune.compress(Residual(), "l1", _x(), flops)


def test_bad_round_to_and_min_channels():
    with pytest.raises(fxprune.ConfigError, match="round_to"):
        fxprune.compress(Residual(), "l1", _x(), 0.5, round_to=0)
    with pytest.raises(fxprune.ConfigError, match="min_channels"):
        fxprune.compress(Residual(), "l1", _x(), 0.5, min_channels=0)


class _ControlFlowOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow in the root's own forward
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_model_raises_trace_error_with_remedy():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.compress(_ControlFlowOnValues(), "l1", _x(), 0.5)
    msg = str(info.value)
    assert "the model's own forward()" in msg and "control flow" in msg
    assert "leaf_modules=" in msg and "concrete_args=" in msg
    assert info.value.module_path == ""


class _OnlyFixedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)  # input and output channels are both fixed


def test_nothing_prunable():
    with pytest.raises(fxprune.NothingToPruneError, match="no prunable channel group.*main reason"):
        fxprune.compress(_OnlyFixedChannels(), "l1", _x(), 0.5)


@pytest.mark.parametrize("x", [torch.randn(1, 4, 8, 8), torch.randn(3, 8, 8, 8)[..., :2]])
def test_example_inputs_of_wrong_shape(x):
    with pytest.raises(fxprune.InputError, match="do not fit the model.*stem_0.*Pass inputs shaped like"):
        fxprune.compress(Residual(), "l1", x, 0.5)


def test_missing_or_extra_example_inputs():
    with pytest.raises(fxprune.InputError, match="example_inputs is required"):
        fxprune.compress(Residual(), "l1", None, 0.5)
    with pytest.raises(fxprune.InputError, match="takes 1 inputs but example_inputs has 2"):
        fxprune.compress(Residual(), "l1", (_x(), _x()), 0.5)
    with pytest.raises(fxprune.InputError, match="does not take"):
        fxprune.compress(Residual(), "l1", {"y": _x()}, 0.5)


def test_unreachable_target_says_the_minimum():
    with pytest.raises(fxprune.TargetUnreachableError) as info:
        fxprune.compress(Residual(), "l1", _x(), 0.01)
    err = info.value
    assert 0.01 < err.minimum < 1
    assert f"flops >= {err.minimum:.4f}" in str(err)


def test_not_a_module():
    with pytest.raises(fxprune.ConfigError, match="must be a torch.nn.Module"):
        fxprune.compress(lambda x: x, "l1", _x(), 0.5)


def test_errors_share_a_base_class():
    for cls in (fxprune.ConfigError, fxprune.InputError, fxprune.TraceError, fxprune.NothingToPruneError,
                fxprune.TargetUnreachableError, fxprune.VerificationError):
        assert issubclass(cls, fxprune.FxpruneError)
