"""`compress` warns when a model that runs on a GPU is cut to channel counts that are not multiples
of 8 with round_to None (`fxprune.tensor_cores`): measured on an H200, such a slim model ran 0.70x
the original's speed at half the FLOPs. No GPU here: "runs on a GPU" is patched in."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import fxprune
from fxprune import tensor_cores


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)


def _compress(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim = fxprune.compress(model, "uniform", x, flops=0.5, **kw)
    return slim, [w for w in caught if issubclass(w.category, fxprune.TensorCoreWarning)]


def test_a_gpu_model_cut_to_unaligned_counts_warns_and_the_report_says_so(resnet18, monkeypatch):
    model, x = resnet18
    monkeypatch.setattr(tensor_cores, "runs_on_gpu", lambda model, device: True)
    slim, caught = _compress(model, x)
    note = slim.fxprune_report.details["tensor_cores"]
    assert len(caught) == 1 and "round_to=8" in str(caught[0].message)
    assert note["groups_not_multiple_of_8"] >= 1
    name, kept, size = note["examples"][0]
    assert size % 8 == 0 and kept % 8 and kept < size
    # every listed layer really is that wide in the slim model (not an off-by-a-unit count)
    widths = {n: m.out_channels for n, m in slim.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert kept in widths.values()
    slim8, caught8 = _compress(model, x, round_to=8)
    assert not caught8 and "tensor_cores" not in (slim8.fxprune_report.details or {})
    assert all(w % 8 == 0 for n, w in ((n, m.out_channels) for n, m in slim8.named_modules()
                                       if isinstance(m, torch.nn.Conv2d)) if n != "fc")


def test_a_cpu_model_is_not_warned(resnet18):
    model, x = resnet18
    slim, caught = _compress(model, x)
    assert not caught and "tensor_cores" not in (slim.fxprune_report.details or {})


def test_runs_on_gpu_reads_the_device_and_the_parameters():
    model = torch.nn.Conv2d(3, 8, 3)
    assert tensor_cores.runs_on_gpu(model, "cuda:1") and tensor_cores.runs_on_gpu(model, "cuda")
    assert not tensor_cores.runs_on_gpu(model, "cpu") and not tensor_cores.runs_on_gpu(model, None)


def test_a_method_without_round_to_is_not_told_to_pass_it(resnet18):
    """gate_decorator and gal take no round_to: their warning names the methods that do instead."""
    model, x = resnet18
    analysis = fxprune.analyze(model, x)
    slim = fxprune.compress(model, "uniform", x, flops=0.5)
    plan = fxprune.PruningPlan(keep={int(g): u for g, u in slim.fxprune_recipe["plan"]["keep"].items()})
    with pytest.warns(fxprune.TensorCoreWarning, match="gate_decorator does not take round_to") as caught:
        note = tensor_cores.warn_if_misaligned(model, "cuda", None, analysis.channels, plan, "gate_decorator",
                                               rounds=False)
    assert note["groups_not_multiple_of_8"] >= 1 and "pass round_to=8" not in str(caught[0].message)
    assert tensor_cores.warn_if_misaligned(model, "cuda", 8, analysis.channels, plan) is None
