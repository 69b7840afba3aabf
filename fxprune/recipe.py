"""Recipes: how to rebuild a slim model from its base model, as plain JSON.

A recipe records what the compiler needs to redo the same analysis (example input shapes and
dtypes, leaf modules, concrete args, ignored modules), a fingerprint of the channel groups it
found, and the plan (kept unit indices per group, removed branches and concat inputs, folded
scales). `replay(recipe, base)` re-traces `base`, checks the fingerprint, and applies the plan;
the weights are loaded afterwards (`fxprune.artifacts`). Nothing is pickled.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.passes.plan import PruningPlan
from fxprune.passes.rewrite import apply_plan

from .analysis import ModelAnalysis, analyze, with_grouped
from .errors import ArtifactError, FxpruneError
from .passes.inputs import ExampleInputs
from .recipe_schema import DTYPES

RECIPE_FORMAT = 2  # 2: the whole recipe is checksummed, the base is allow-listed, outputs are fingerprinted
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


def _decode_entry(item: Any, trust_code: bool = False) -> Any:
    """A recorded leaf_modules/ignore entry. A module type is looked up among the modules already
    imported (the base model's own classes are); importing one the file names needs `trust_code`."""
    if isinstance(item, str):
        return item
    path = item["type"]
    module, _, qualname = path.rpartition(".")
    try:
        obj = importlib.import_module(module) if trust_code else sys.modules[module]
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, KeyError, AttributeError) as exc:
        raise ArtifactError(f"the recipe names module type {path}, which is not imported here (load imports "
                            "nothing the file names unless trust_code=True): import it first") from exc
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArtifactError(f"the recipe names {path} as a module type, but it is not an nn.Module subclass")
    return obj


def _encode_value(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"tensor": {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}}
    if isinstance(x, _JSON_SCALARS):
        return {"value": x}
    raise ArtifactError(f"cannot record an example input of type {type(x).__name__} in a recipe")


def _decode_value(x: dict) -> Any:
    if "tensor" in x:
        spec = x["tensor"]
        dtype = DTYPES[spec["dtype"]]
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


def make_recipe(analysis: ModelAnalysis, plan: PruningPlan, model: nn.Module | None = None) -> dict:
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
        "grouped": opts.get("grouped", "whole"),
        **({"heads": opts["heads"]} if opts.get("heads", "whole") != "whole" else {}),
        **({"layernorm": opts["layernorm"]} if opts.get("layernorm", "boundary") != "boundary" else {}),
        "groups": fingerprint(analysis.channels),
        "plan": {
            "keep": {str(k): [int(i) for i in np.asarray(list(v))] for k, v in plan.keep.items()},
            "remove_branches": [list(b) for b in plan.remove_branches],
            "drop_concat_inputs": [list(c) for c in plan.drop_concat_inputs],
            "fold_scales": list(plan.fold_scales),
            "scale_inputs": [[str(n), int(o), float(v)] for n, o, v in plan.scale_inputs],
        },
    }


def plan_of(recipe: dict) -> PruningPlan:
    p = recipe["plan"]
    return PruningPlan(keep={int(k): np.asarray(v, dtype=np.int64) for k, v in p["keep"].items()},
                       remove_branches=[tuple(b) for b in p["remove_branches"]],
                       drop_concat_inputs=[tuple(c) for c in p["drop_concat_inputs"]],
                       fold_scales=list(p["fold_scales"]),
                       scale_inputs=[(n, o, v) for n, o, v in p.get("scale_inputs", [])])


def _check_structures(recipe: dict, analysis: ModelAnalysis) -> None:
    """The plan's removed branches and concat inputs must be structures the analysis found."""
    found = {"remove_branches": {(b.add, b.operand) for b in analysis.structures.residual_branches},
             "drop_concat_inputs": {(c.cat, c.index) for c in analysis.structures.concat_inputs}}
    for key, known in found.items():
        for ref in recipe["plan"][key]:
            if tuple(ref) not in known:
                raise ArtifactError(f"plan.{key} names {ref}, which is not a removable structure of the rebuilt "
                                    "model: the recipe was edited or made for another model")
    nodes = {n.name: n for n in analysis.traced.graph_module.graph.nodes}
    for name, operand, _ in recipe["plan"].get("scale_inputs", []):
        node = nodes.get(name)
        inputs = None if node is None else (node.args[0] if node.args and isinstance(node.args[0], (list, tuple))
                                            else node.args)
        if inputs is None or operand >= len(inputs) or not isinstance(inputs[operand], torch.fx.Node):
            raise ArtifactError(f"plan.scale_inputs names input {operand} of node {name!r}, which the rebuilt "
                                "model does not have")
    attributes = {n.target for n in analysis.traced.graph_module.graph.nodes if n.op == "get_attr"}
    for name in recipe["plan"]["fold_scales"]:
        if name not in attributes:
            raise ArtifactError(f"plan.fold_scales names {name!r}, which is no scale tensor of the rebuilt model")
    prunable = {g.index for g in analysis.channels.prunable_groups}
    for key in recipe["plan"]["keep"]:
        if int(key) not in prunable:
            raise ArtifactError(f"plan.keep names group {key}, which is not prunable in the rebuilt model")


def replay(recipe: dict, base: nn.Module, *, trust_code: bool = False) -> fx.GraphModule:
    """Rebuild the slim structure on `base` (weights are still the base's). `base` is converted in
    place to the recorded dtype and train/eval mode: pass a copy. `recipe` must have passed
    `recipe_schema.validate`; whatever still goes wrong is an ArtifactError."""
    base = base.to(DTYPES[recipe["dtype"]])
    base.train(recipe["training"])
    try:
        analysis = analyze(base, decode_inputs(recipe["inputs"]),
                           ignore=[_decode_entry(e, trust_code) for e in recipe["ignore"]],
                           leaf_modules=[_decode_entry(e, trust_code) for e in recipe["trace"]["leaf_modules"]],
                           concrete_args=recipe["trace"]["concrete_args"] or None)
        analysis = with_grouped(analysis, recipe.get("grouped", "whole"), recipe.get("heads", "whole"),
                                recipe.get("layernorm", "boundary"))
    except ArtifactError:
        raise
    except FxpruneError as exc:
        raise ArtifactError(f"the base model cannot be analysed as the recipe says: {exc}") from exc
    found = fingerprint(analysis.channels)
    if found != recipe["groups"]:
        detail = next((f"group {i}: recipe has {a}, rebuilt model has {b}"
                       for i, (a, b) in enumerate(zip(recipe["groups"], found)) if a != b),
                      f"recipe has {len(recipe['groups'])} groups, rebuilt model has {len(found)}")
        raise ArtifactError(
            f"the base model does not match the recipe ({detail}); load it with the base model "
            f"architecture the artifact was made from ({recipe['base'].get('cls')})")
    _check_structures(recipe, analysis)
    try:
        slim = apply_plan(analysis.channels, plan_of(recipe))
    except (IndexError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ArtifactError(f"the recipe's plan cannot be applied to the base model ({type(exc).__name__}: "
                            f"{exc}): the recipe was edited or made for another model") from exc
    slim.training = recipe["training"]
    return slim
