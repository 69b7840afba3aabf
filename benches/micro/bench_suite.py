"""The benchmark suite as pytest-benchmark tests: fxprune against the original models and
against Torch-Pruning (when installed), grouped per model so the tables compare them directly.

Run: ``python -m pytest benches/micro/bench_suite.py --benchmark-only -p no:cacheprovider``
(add ``-k resnet50`` for one model). ``python -m benches.harness`` runs the same measurements with the goals,
docs/benchmarks.md, the JSON and the plots; this file is for pytest-benchmark's statistics and
``--benchmark-compare`` between commits.

* group ``compile <model>``: fxprune's `compress(verify=False)` (trace, shapes, analysis, l1
  method, rewrite) vs Torch-Pruning's dependency graph + ``step()`` at the same MACs target;
* group ``latency <model> b<batch>``: the original, fxprune's slim model and Torch-Pruning's at
  half the FLOPs, CPU fp32 eager, ``torch.set_num_threads(2)``.
"""
from __future__ import annotations

import pytest
import torch

import fxprune
from benches.harness.config import DEFAULT_MODELS, model_spec
from benches.harness.metrics import count_macs
from benches.harness.peer import _fresh_copy, _prune_in_place, classifier_layers, prune_to_macs, torch_pruning_status
from fxprune.passes.inputs import ExampleInputs
from fxprune.latency import steady_heap
from fxprune.models import build_model, default_input_shape, example_input

FLOPS = 0.5
BATCHES = (1, 32)


@pytest.fixture(scope="module", params=DEFAULT_MODELS)
def prepared(request):
    torch.set_num_threads(2)
    spec = model_spec(request.param)
    model = build_model(spec).eval()
    shape = default_input_shape(spec)
    x = ExampleInputs.normalize(example_input(shape))
    macs = count_macs(model, x)
    slim = fxprune.compress(model, "l1", x, FLOPS)
    tp, _ = torch_pruning_status()
    peer = prune_to_macs(model, x, FLOPS, macs_before=macs) if tp is not None else None
    return request.param, model, shape, x, macs, slim, peer


def test_compile_fxprune(benchmark, prepared):
    name, model, _, x, macs, slim, _ = prepared
    benchmark.group = f"compile {name}"
    benchmark.extra_info.update(macs_fraction=slim.fxprune_report.macs_ratio)
    benchmark.pedantic(fxprune.compress, args=(model, "l1", x, FLOPS), kwargs={"verify": False}, rounds=5,
                       warmup_rounds=1)


def test_compile_torch_pruning(benchmark, prepared):
    name, model, _, x, macs, _, peer = prepared
    if peer is None:
        pytest.skip(torch_pruning_status()[1])
    if not peer.ok:
        pytest.skip(f"Torch-Pruning does not convert {name}: {peer.error}")
    benchmark.group = f"compile {name}"
    benchmark.extra_info.update(macs_fraction=peer.macs_fraction, pruning_ratio=peer.ratio)
    ignored = classifier_layers(model, x)

    def setup():  # a fresh copy per round, made outside the timing
        work, ignored_copy = _fresh_copy(model, ignored)
        return (work, x, peer.ratio, None, ignored_copy), {}

    benchmark.pedantic(_prune_in_place, setup=setup, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("which", ["original", "fxprune", "torch_pruning"])
def test_latency(benchmark, prepared, which, batch):
    name, model, shape, _, macs, slim, peer = prepared
    if which == "torch_pruning" and (peer is None or not peer.ok):
        pytest.skip(torch_pruning_status()[1] if peer is None else f"Torch-Pruning does not convert {name}")
    module = {"original": model, "fxprune": slim, "torch_pruning": peer and peer.model}[which]
    x = ExampleInputs.normalize(example_input((batch, *shape[1:])))
    benchmark.group = f"latency {name} b{batch}"
    benchmark.extra_info.update(macs=count_macs(module, example_input(shape)), macs_original=macs)
    with torch.inference_mode(), steady_heap() as steady:  # as the harness times (see steady_heap)
        benchmark.extra_info["steady_heap"] = steady
        benchmark.pedantic(x.call, args=(module,), rounds=5 if batch == 1 else 3, warmup_rounds=1)
