"""Gate Decorator's and GAL's ``fused_kernels`` option: "auto" (the default) trains through the fused
graph exactly where it was measured faster and computes the same training (a CPU, no module hooks
a compact region would skip, no torch.distributed); True / False force it; anything else is refused.
The decision and its reason are in the report."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.methods import fused_kernels
from fxprune.methods.gal.method import GALOptions
from fxprune.methods.gate_decorator.method import GateDecoratorOptions
from fxprune.nets import NETS


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


def test_auto_is_on_for_a_cpu_network_without_hooks_and_forcing_wins():
    assert fused_kernels.decide("auto", _net()) == (True, f"auto: on, training on a CPU ({torch.get_num_threads()} "
                                                          "threads)")
    assert fused_kernels.decide(False, _net())[0] is False
    assert fused_kernels.decide(True, _net().to("meta"))[0] is True


def test_auto_is_off_off_the_cpu_with_hooks_and_under_distributed(monkeypatch):
    used, why = fused_kernels.decide("auto", _net().to("meta"))
    assert not used and "on meta" in why
    net = _net()
    handle = net[1].register_forward_pre_hook(lambda *a: None)
    used, why = fused_kernels.decide("auto", net)
    assert not used and "hooks" in why and "1" in why
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        used, why = fused_kernels.decide("auto", _net())
        assert not used and "global module hooks" in why
    finally:
        handle.remove()
    monkeypatch.setattr(fused_kernels, "is_distributed", lambda: True)
    used, why = fused_kernels.decide("auto", _net())
    assert not used and "distributed" in why


@pytest.mark.parametrize("options", [GateDecoratorOptions, GALOptions])
@pytest.mark.parametrize("value", ["yes", 1, None, "Auto"])
def test_other_values_are_refused(options, value):
    with pytest.raises(fxprune.ConfigError, match="fused_kernels"):
        options(fused_kernels=value)


def test_the_report_says_what_ran_and_why():
    """Gate Decorator on a CPU: on by default; a forward hook on one of the network's convs turns it
    off (the hook runs during training, as without fxprune); forced off, it says so. GAL: on."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    opts = dict(p=0.3, finetune_epochs=0, tock_epochs=1)

    def run(model, **extra):
        slim = fxprune.compress(model, "gate_decorator", x, 0.6, data=data, options=opts | extra)
        return slim.fxprune_report.details["fused_kernels"]

    assert run(NETS["resnet20"]())["used"] is True
    model = NETS["resnet20"]()
    calls = []
    next(m for m in model.modules() if isinstance(m, nn.Conv2d)).register_forward_hook(lambda *a: calls.append(1))
    report = run(model)
    assert report["used"] is False and "hooks" in report["why"] and calls
    assert run(NETS["resnet20"](), fused_kernels=False) == {"used": False, "why": "set by the caller"}
    gal = fxprune.compress(NETS["resnet20"](), "gal", x, 0.6, data=[d[0] for d in data], options=dict(epochs=1))
    assert gal.fxprune_report.details["fused_kernels"]["used"] is True
