"""Compiler speed on torchvision models: trace, shapes, analysis, method, rewrite (no verify).

Run: ``python -m pytest benches/micro/bench_compile.py --benchmark-only -p no:cacheprovider``.
Goal (issue 2): trace + analysis + rewrite of resnet50 well under 1 s on a 2-core CPU.
The models are those of issue 8's suite (`benches.harness.config.DEFAULT_MODELS`); the harness
(``python -m benches.harness``) reports the same stages next to Torch-Pruning's time (docs/benchmarks.md).
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune
from benches.harness.config import DEFAULT_MODELS
from fxprune.constraints import Constraints
from fxprune.methods import get_method
from fxprune.models import default_input_shape
from fxprune.methods.selection import select
from fxprune.passes.shapes import propagate
from fxprune.verify import verify
from fxprune.passes.dependency import analyze_dependencies
from fxprune.passes.mask import masked_reference
from fxprune.passes.rewrite import apply_plan
from fxprune.passes.structures import find_structures

MODELS = list(DEFAULT_MODELS)


@pytest.fixture(scope="module", params=MODELS)
def prepared(request):
    torch.set_num_threads(2)
    model = torchvision.models.get_model(request.param, weights=None).eval()
    x = fxprune.ExampleInputs.normalize(torch.randn(default_input_shape(f"torchvision:{request.param}")))
    analysis = fxprune.analyze(model, x)
    plan = select(analysis.channels, analysis.cost, get_method("l1").criterion.scores(analysis.channels), Constraints(flops=0.5))
    return request.param, model, x, analysis, plan


def test_trace(benchmark, prepared):
    _, model, *_ = prepared
    benchmark(fxprune.trace, model)


def test_shapes(benchmark, prepared):
    _, model, x, *_ = prepared
    gm = fxprune.trace(model).graph_module
    benchmark(propagate, gm, x)


def test_analysis(benchmark, prepared):
    _, model, x, *_ = prepared
    gm = fxprune.trace(model).graph_module
    propagate(gm, x)

    def run():
        find_structures(analyze_dependencies(gm))

    benchmark(run)


def test_select_l1(benchmark, prepared):
    *_, analysis, _ = prepared
    benchmark(lambda: select(analysis.channels, analysis.cost, get_method("l1").criterion.scores(analysis.channels), Constraints(flops=0.5)))


def test_rewrite(benchmark, prepared):
    *_, analysis, plan = prepared
    benchmark(apply_plan, analysis.channels, plan)


def test_verify(benchmark, prepared):
    *_, analysis, plan = prepared
    slim = apply_plan(analysis.channels, plan)
    reference = masked_reference(analysis.channels, plan)
    benchmark(verify, reference, slim, analysis.inputs)


def test_compile_end_to_end(benchmark, prepared):
    """trace + shapes + analysis + l1 selection + rewrite: what `compress(verify=False)` costs."""
    _, model, x, *_ = prepared
    benchmark.pedantic(fxprune.compress, args=(model, "l1", x, 0.5), kwargs={"verify": False},
                       rounds=5, warmup_rounds=1)
