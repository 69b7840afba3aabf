"""Saved slim models: a recipe (JSON), the weights (safetensors) and a per-layer shape summary.

    path/recipe.json        how to rebuild: base model, example input specs, plan, versions, checksum
    path/model.safetensors  every parameter and buffer of the slim model
    path/shapes.txt         `name: [shape] dtype` per tensor, for humans and diffs

`load` replays the recipe on a freshly built base model and loads the weights; it never unpickles.
Each file is written to a temporary name and renamed into place, recipe.json last, so an
interrupted save leaves no artifact that `load` would accept.

Example::

    >>> fxprune.save(slim, "out/resnet50")
    >>> again = fxprune.load("out/resnet50")            # base rebuilt from the recipe's spec
    >>> again = fxprune.load("out/resnet50", base_model=my_model)
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import ArtifactError
from .models import build_model
from .recipe import RECIPE_FORMAT, replay

RECIPE, WEIGHTS, SHAPES = "recipe.json", "model.safetensors", "shapes.txt"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _tensors(slim: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in slim.state_dict().items()}


def shape_summary(slim: nn.Module) -> str:
    return "".join(f"{k}: {list(v.shape)} {str(v.dtype).removeprefix('torch.')}\n" for k, v in slim.state_dict().items())


def save(slim: nn.Module, path: str | os.PathLike, *, base_spec: str | None = None, **base_kwargs) -> Path:
    """Save a model made by `fxprune.compress`/`prune_with_plan` (see module docstring).

    `base_spec` ("torchvision:resnet50", "package.module:factory") says how `load` builds the base
    model; it defaults to the spec the model was built from by fxprune's CLI/zoo, if any.
    """
    from safetensors.torch import save as to_safetensors

    recipe = getattr(slim, "fxprune_recipe", None)
    if recipe is None:
        raise ArtifactError("this module has no fxprune recipe: save models returned by fxprune.compress "
                            "or fxprune.prune_with_plan")
    recipe = json.loads(json.dumps(recipe))
    if base_spec is not None:
        recipe["base"].update(spec=base_spec, kwargs=base_kwargs)
    path = Path(path)
    weights = to_safetensors(_tensors(slim))
    report = getattr(slim, "fxprune_report", None)
    recipe.update(
        versions={"fxprune": _version(), "torch": torch.__version__, "torchvision": torchvision.__version__},
        weights={"file": WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
        report=None if report is None else report.summary(),
    )
    atomic_write(path / WEIGHTS, weights)
    atomic_write(path / SHAPES, shape_summary(slim).encode())
    atomic_write(path / RECIPE, json.dumps(recipe, indent=1).encode())
    return path


def _version() -> str:
    from . import __version__

    return __version__


def read_recipe(path: Path) -> dict:
    file = path / RECIPE
    if not file.exists():
        raise ArtifactError(f"{file} is missing: {path} is not an fxprune artifact, or its save was interrupted")
    try:
        recipe = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file} is truncated or corrupted ({exc}); save the model again") from exc
    missing = {"format", "base", "inputs", "plan", "groups", "weights"} - set(recipe)
    if missing:
        raise ArtifactError(f"{file} lacks {sorted(missing)}: not a complete fxprune recipe")
    if recipe["format"] != RECIPE_FORMAT:
        raise ArtifactError(f"{file} has recipe format {recipe['format']}; this fxprune reads format {RECIPE_FORMAT}")
    return recipe


def _read_weights(path: Path, recipe: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as from_safetensors

    file = path / recipe["weights"]["file"]
    if not file.exists():
        raise ArtifactError(f"{file} is missing: the artifact is incomplete")
    data = file.read_bytes()
    if len(data) != recipe["weights"]["bytes"] or hashlib.sha256(data).hexdigest() != recipe["weights"]["sha256"]:
        raise ArtifactError(f"{file} does not match the checksum in {RECIPE} ({len(data)} bytes, expected "
                            f"{recipe['weights']['bytes']}): the file is truncated or corrupted")
    return from_safetensors(data)


def load(path: str | os.PathLike, base_model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved slim model (see module docstring); the base model is not modified."""
    path = Path(path)
    recipe = read_recipe(path)
    tensors = _read_weights(path, recipe)
    if base_model is None:
        spec = recipe["base"].get("spec")
        if not spec:
            raise ArtifactError(f"the recipe does not say how to build its base model ({recipe['base'].get('cls')}): "
                                "pass base_model=, or save with base_spec='package.module:factory'")
        base_model = build_model(spec, **recipe["base"].get("kwargs", {}))
    slim = copy.deepcopy(base_model)
    submodule = recipe["base"].get("submodule")
    if submodule:  # only this part was pruned (a detector's backbone); the rest is kept whole
        parent, _, attr = submodule.rpartition(".")
        owner = slim.get_submodule(parent) if parent else slim
        setattr(owner, attr, replay(recipe, getattr(owner, attr)))
    else:
        slim = replay(recipe, slim)
    expected = slim.state_dict()
    if set(expected) != set(tensors):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ArtifactError(f"weights do not match the rebuilt model: unexpected {extra[:5]}, missing {missing[:5]}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise ArtifactError(f"weight {k} has shape {list(tensors[k].shape)} in the file but "
                                f"{list(v.shape)} in the rebuilt model")
    slim.load_state_dict(tensors, strict=True)
    slim.fxprune_recipe = {k: v for k, v in recipe.items() if k not in ("versions", "weights", "report")}
    return slim.to(device)
