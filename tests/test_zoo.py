"""Every torchvision classification model compresses at flops=0.5 with l1, verifies, and lands at
or under 0.5 (+1%) of its MACs. The small ones run by default; the rest with `-m slow`."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune

from .conftest import assert_module_attributes_consistent, make_verification_sensitive, measured_macs, n_params

ALL = torchvision.models.list_models(module=torchvision.models)
FAST = {"resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5",
        "squeezenet1_1", "mnasnet0_5", "regnet_x_400mf", "regnet_y_400mf", "efficientnet_b0", "densenet121",
        "googlenet", "inception_v3", "convnext_tiny", "vit_b_32", "swin_t", "maxvit_t", "alexnet", "vgg11_bn"}
INPUT_SIZE = {"inception_v3": 299}


def _params():
    for name in ALL:
        marks = () if name in FAST else (pytest.mark.slow,)
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_zoo_model_compresses_to_half_flops(name):
    torch.manual_seed(0)
    model = make_verification_sensitive(torchvision.models.get_model(name, weights=None).eval())
    size = INPUT_SIZE.get(name, 224)
    x = torch.randn(1, 3, size, size)
    slim = fxprune.compress(model, "l1", x, flops=0.5)  # verify=True: raises if outputs differ
    report = slim.fxprune_report
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    assert report.macs_after <= 0.5 * 1.01 * report.macs_before
    assert measured_macs(slim, x) == report.macs_after  # the cost model's recount is exact
    assert n_params(slim) == report.params_after < report.params_before
    assert not slim.training
    assert_module_attributes_consistent(slim)
