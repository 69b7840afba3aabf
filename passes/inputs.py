"""Example inputs and nested outputs.

`example_inputs` may be a tensor, a tuple/list of positional arguments, or a dict of keyword
arguments. Outputs may be any nesting of tuples, lists, dicts and namedtuples; verification
compares every tensor leaf, which `torch.utils._pytree` flattens for us (it knows namedtuples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxprune.errors import InputError


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword arguments of one forward call."""

    args: tuple
    kwargs: dict

    @classmethod
    def normalize(cls, example_inputs: Any) -> "ExampleInputs":
        if example_inputs is None:
            raise InputError(
                "example_inputs is required: pass a tensor shaped like a real batch, "
                "e.g. torch.randn(1, 3, 224, 224)."
            )
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if isinstance(example_inputs, torch.Tensor):
            return cls((example_inputs,), {}).checked()
        if isinstance(example_inputs, dict):
            if not all(isinstance(k, str) for k in example_inputs):
                raise InputError("example_inputs as a dict must map forward-argument names (strings) to values")
            return cls((), dict(example_inputs)).checked()
        if isinstance(example_inputs, (tuple, list)):
            return cls(tuple(example_inputs), {}).checked()
        raise InputError(
            f"example_inputs of type {type(example_inputs).__name__} is not supported: pass a "
            "tensor, a tuple of positional arguments or a dict of keyword arguments."
        )

    def checked(self) -> "ExampleInputs":
        """Self, after refusing tensors that cannot stand for a real batch: verification and
        shape propagation need values (not meta tensors) and at least one sample."""
        for i, t in enumerate(self.tensors()):
            if t.device.type == "meta":
                raise InputError(f"example input {i} is on the meta device and has no values: pass real tensors, "
                                 "e.g. torch.randn(1, 3, 224, 224)")
            if t.numel() == 0 and t.ndim > 0:
                raise InputError(f"example input {i} has shape {tuple(t.shape)}, with no elements: pass at least "
                                 "one sample (batch size >= 1)")
        return self

    def tensors(self) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    def map_tensors(self, fn) -> "ExampleInputs":
        def one(x):
            return fn(x) if isinstance(x, torch.Tensor) else x

        args, kwargs = pytree.tree_map(one, (self.args, self.kwargs))
        return ExampleInputs(tuple(args), dict(kwargs))

    def random_like(self, generator: torch.Generator | None = None) -> "ExampleInputs":
        """Fresh random inputs of the same shapes, dtypes and devices (integers stay in range)."""

        def one(x: torch.Tensor) -> torch.Tensor:
            if x.is_floating_point() or x.is_complex():
                r = torch.randn(x.shape, generator=generator, dtype=torch.float32)
                return r.to(device=x.device, dtype=x.dtype)
            if x.dtype == torch.bool:
                return x.clone()
            lo, hi = int(x.min()) if x.numel() else 0, int(x.max()) + 1 if x.numel() else 1
            r = torch.randint(lo, max(hi, lo + 1), x.shape, generator=generator)
            return r.to(device=x.device, dtype=x.dtype)

        return self.map_tensors(one)

    def call(self, module: torch.nn.Module):
        return module(*self.args, **self.kwargs)


def output_leaves(output: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a (nested) output, with a readable path such as `[0].aux` or `['out']`."""
    flat, _ = pytree.tree_flatten_with_path(output)
    return [
        (pytree.keystr(path) or "output", leaf)
        for path, leaf in flat
        if isinstance(leaf, torch.Tensor)
    ]
