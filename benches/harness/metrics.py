"""Counting one model: MACs (FlopCounterMode's FLOPs / 2, the counter fxprune's cost model uses),
parameters and output shapes, so fxprune's and Torch-Pruning's models are measured alike.

Example::

    >>> import torch, torchvision
    >>> from benches.harness.metrics import count_macs, output_shapes
    >>> m, x = torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)
    >>> count_macs(m, x) // 10**6, output_shapes(m, x)
    (1814, [(1, 1000)])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxprune.passes.inputs import ExampleInputs, output_leaves
from fxprune.passes.shapes import standard_attention_path
from fxprune.verify import eval_mode


def _run(model: nn.Module, inputs: ExampleInputs, counter: FlopCounterMode | None = None):
    with torch.no_grad(), eval_mode(model), standard_attention_path():
        if counter is None:
            return inputs.call(model)
        with counter:
            return inputs.call(model)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass in eval mode (FLOPs = 2 x this)."""
    counter = FlopCounterMode(display=False)
    _run(model, ExampleInputs.normalize(example_inputs), counter)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_shapes(model: nn.Module, example_inputs: Any) -> list[tuple]:
    """Shapes of every tensor of the (nested) output, in eval mode."""
    out = _run(model, ExampleInputs.normalize(example_inputs))
    return [tuple(t.shape) for _, t in output_leaves(out)]
