"""Recipes: how to rebuild a slim model from its base model, as plain JSON.

A recipe records what the compiler needs to redo the same analysis (example input shapes and
dtypes, leaf modules, concrete args, ignored modules), a fingerprint of the channel groups it
found, and the plan (kept unit indices per group, removed branches and concat inputs, folded
scales). `replay(recipe, base)` re-traces `base`, checks the fingerprint, and applies the plan;
the weights are loaded afterwards (`fxprune.artifacts`). Nothing is pickled.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from passes.rewrite import PruningPlan, apply_plan

from .errors import ArtifactError
from .inputs import ExampleInputs

RECIPE_FORMAT = 1
_JSON_SCALARS = (bool, int, float, str, type(None))


def _encode_entry(item: Any, model: nn.Module | None) -> Any:
    """A leaf_modules/ignore entry as JSON: names as they are, types by import path."""
    if isinstance(item, str):
        return item
    if isinstance(item, type):
        return {"type": f"{item.__module__}.{item.__qualname__}"}
    if isinstance(item, nn.Module) and model is not None:
        for name, m in model.named_modules():
            if m is item:
                return name
    raise ArtifactError(f"cannot record {item!r} in a recipe: use module names or types")


def _decode_entry(item: Any) -> Any:
    if isinstance(item, str):
        return item
    path = item["type"]
    module, _, qualname = path.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"the recipe names module type {path}, which cannot be imported here: {exc}") from exc


def _encode_value(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"tensor": {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}}
    if isinstance(x, _JSON_SCALARS):
        return {"value": x}
    raise ArtifactError(f"cannot record an example input of type {type(x).__name__} in a recipe")


def _decode_value(x: dict) -> Any:
    if "tensor" in x:
        spec = x["tensor"]
        dtype = getattr(torch, spec["dtype"])
        gen = torch.Generator().manual_seed(0)
        if dtype.is_floating_point:
            return torch.randn(spec["shape"], generator=gen).to(dtype)
        return torch.zeros(spec["shape"], dtype=dtype)
    return x["value"]


def encode_inputs(inputs: ExampleInputs) -> dict:
    return {"args": [_encode_value(a) for a in inputs.args],
            "kwargs": {k: _encode_value(v) for k, v in inputs.kwargs.items()}}


def decode_inputs(data: dict) -> ExampleInputs:
    return ExampleInputs(tuple(_decode_value(a) for a in data["args"]),
                         {k: _decode_value(v) for k, v in data["kwargs"].items()})


def fingerprint(channels) -> list:
    return [[g.n_units, g.leading.target, g.leading.dim] for g in channels.groups]


def make_recipe(analysis, plan: PruningPlan, model: nn.Module | None = None) -> dict:
    """The JSON-able recipe of `plan` applied to `analysis` (see module docstring)."""
    opts = analysis.options
    concrete = opts.get("concrete_args") or {}
    if not all(isinstance(v, _JSON_SCALARS) for v in concrete.values()):
        raise ArtifactError("concrete_args values must be JSON scalars (bool, int, float, str, None) to be recorded")
    gm = analysis.traced.graph_module
    params = list(gm.parameters())
    return {
        "format": RECIPE_FORMAT,
        "base": dict(analysis.source or {"spec": None, "kwargs": {}}, cls=analysis.model_class),
        "inputs": encode_inputs(analysis.inputs),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else "float32",
        "training": bool(gm.training),
        "trace": {"leaf_modules": [_encode_entry(e, model) for e in opts.get("leaf_modules", ())],
                  "concrete_args": concrete},
        "ignore": [_encode_entry(e, model) for e in opts.get("ignore", ())],
        "groups": fingerprint(analysis.channels),
        "plan": {
            "keep": {str(k): [int(i) for i in np.asarray(list(v))] for k, v in plan.keep.items()},
            "remove_branches": [list(b) for b in plan.remove_branches],
            "drop_concat_inputs": [list(c) for c in plan.drop_concat_inputs],
            "fold_scales": list(plan.fold_scales),
        },
    }


def plan_of(recipe: dict) -> PruningPlan:
    p = recipe["plan"]
    return PruningPlan(keep={int(k): np.asarray(v, dtype=np.int64) for k, v in p["keep"].items()},
                       remove_branches=[tuple(b) for b in p["remove_branches"]],
                       drop_concat_inputs=[tuple(c) for c in p["drop_concat_inputs"]],
                       fold_scales=list(p["fold_scales"]))


def replay(recipe: dict, base: nn.Module) -> fx.GraphModule:
    """Rebuild the slim structure on `base` (weights are still the base's). `base` is converted in
    place to the recorded dtype and train/eval mode: pass a copy."""
    from .api import analyze  # the api module imports this one

    base = base.to(getattr(torch, recipe["dtype"]))
    base.train(recipe["training"])
    analysis = analyze(base, decode_inputs(recipe["inputs"]),
                       ignore=[_decode_entry(e) for e in recipe["ignore"]],
                       leaf_modules=[_decode_entry(e) for e in recipe["trace"]["leaf_modules"]],
                       concrete_args=recipe["trace"]["concrete_args"] or None)
    found = fingerprint(analysis.channels)
    if found != recipe["groups"]:
        detail = next((f"group {i}: recipe has {a}, rebuilt model has {b}"
                       for i, (a, b) in enumerate(zip(recipe["groups"], found)) if a != b),
                      f"recipe has {len(recipe['groups'])} groups, rebuilt model has {len(found)}")
        raise ArtifactError(
            f"the base model does not match the recipe ({detail}); load it with the base model "
            f"architecture the artifact was made from ({recipe['base'].get('cls')})")
    slim = apply_plan(analysis.channels, plan_of(recipe))
    slim.training = recipe["training"]
    return slim
