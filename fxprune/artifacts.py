"""Saved slim models: a recipe (JSON), the weights (safetensors) and a per-layer shape summary.

    path/recipe.json        how to rebuild: base model, example input specs, plan, versions, the
                            weights' checksum, an output fingerprint, and a checksum of all of it
    path/model.safetensors  every parameter and buffer of the slim model
    path/shapes.txt         `name: [shape] dtype` per tensor, for humans and diffs

An artifact is data. `load` never unpickles and never imports, evaluates or runs anything the file
names unless the caller says `trust_code=True`:

- the whole recipe is covered by a SHA-256 checksum (the weights' own SHA-256 is inside it); with
  `key=` it is an HMAC-SHA256 signature instead, which only holders of the key can forge;
- every field is validated with bounds before anything is allocated (`fxprune.recipe_schema`);
- the base model is built only from an allow-list (torchvision/timm registries by name, fxprune's
  nets, builders registered with `fxprune.register_builder`) or taken from `base_model=`, and
  sized on the meta device first (`max_bytes=`);
- the rebuilt model must reproduce the output fingerprint recorded at save time.

Every failure is an `ArtifactError` naming what does not match. A different torch or fxprune
version than the one that saved is reported with an `ArtifactVersionWarning`. Each file is written
to a temporary name and renamed into place, recipe.json last, so an interrupted save leaves no
artifact that `load` would accept.

Example::

    >>> fxprune.save(slim, "out/resnet50")
    >>> again = fxprune.load("out/resnet50")            # base rebuilt from the recipe's spec
    >>> again = fxprune.load("out/resnet50", base_model=my_model)
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import ArtifactError, ConfigError
from .hooks import preserve_through_deepcopy
from .models import build_trusted, infer_torchvision_spec
from .passes.inputs import output_leaves
from .recipe import RECIPE_FORMAT, decode_inputs, replay
from .recipe_schema import DTYPES as DTYPES_BY_NAME
from .recipe_schema import validate
from .verify import DEFAULT_TOLERANCE, eval_mode
from .version import __version__

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


DEFAULT_MAX_BYTES = 8 * 2**30  # the largest torchvision model (vit_h_14) takes 2.5 GiB
MAX_RECIPE_BYTES = 64 * 2**20
CHECK_SEED = 0


class ArtifactVersionWarning(UserWarning):
    """The artifact was saved by another torch/torchvision/fxprune version than the one loading it."""


def _canonical(recipe: dict) -> bytes:
    body = {k: v for k, v in recipe.items() if k not in ("checksum", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _seal(recipe: dict, key: bytes | None) -> dict:
    recipe.pop("checksum", None)
    recipe.pop("signature", None)
    if key is None:
        recipe["checksum"] = hashlib.sha256(_canonical(recipe)).hexdigest()
    else:
        recipe["signature"] = hmac.new(key, _canonical(recipe), hashlib.sha256).hexdigest()
    return recipe


def _check_seal(recipe: dict, key: bytes | None, file: Path) -> None:
    body = _canonical(recipe)
    if key is not None:
        expected = hmac.new(key, body, hashlib.sha256).hexdigest()
        if not isinstance(recipe.get("signature"), str) or not hmac.compare_digest(recipe["signature"], expected):
            raise ArtifactError(f"{file} is not signed with this key: it was edited, or signed with another key "
                                "(or not signed: load it without key=)")
        return
    if "signature" in recipe:
        raise ArtifactError(f"{file} is signed: pass the key it was signed with, load(..., key=...)")
    if not isinstance(recipe.get("checksum"), str) or recipe["checksum"] != hashlib.sha256(body).hexdigest():
        raise ArtifactError(f"{file} does not match its checksum: the recipe was edited or corrupted; save it again")


def _key(key) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    raise ConfigError(f"key must be bytes or str, got {type(key).__name__}")


def output_fingerprint(model: nn.Module, recipe: dict, seed: int = CHECK_SEED) -> list[dict]:
    """Shape, norm, max |value| and non-finite count of every output leaf on seeded inputs shaped
    like the recorded example inputs: what `load` recomputes to prove it rebuilt the same function."""
    inputs = decode_inputs(recipe["inputs"]).random_like(torch.Generator().manual_seed(seed))
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    inputs = inputs.map_tensors(lambda t: t.to(device))
    with torch.no_grad(), eval_mode(model):
        leaves = output_leaves(inputs.call(model))
    out = []
    for path, t in leaves:
        t = t.detach().double()
        finite = t[torch.isfinite(t)] if t.is_floating_point() else t
        out.append({"path": path, "shape": list(t.shape), "norm": float(finite.norm()) if finite.numel() else 0.0,
                    "absmax": float(finite.abs().max()) if finite.numel() else 0.0,
                    "nonfinite": int(t.numel() - finite.numel())})
    return out


def _compare_fingerprint(recorded: list[dict], found: list[dict], dtype: torch.dtype) -> None:
    tol = 10 * DEFAULT_TOLERANCE.get(dtype, 1e-4)
    if [(r["path"], r["shape"], r["nonfinite"]) for r in recorded] != [
            (f["path"], f["shape"], f["nonfinite"]) for f in found]:
        raise ArtifactError("the rebuilt model's outputs have another structure, shape or number of non-finite "
                            "values than the saved model's: the artifact does not rebuild the model that was saved")
    for r, f in zip(recorded, found):
        for key in ("norm", "absmax"):
            if not math.isclose(r[key], f[key], rel_tol=tol, abs_tol=1e-30):
                raise ArtifactError(f"the rebuilt model's output {r['path']} has {key} {f[key]:.6g}, the saved model's "
                                    f"was {r[key]:.6g}: the artifact does not rebuild the model that was saved")


def save(slim: nn.Module, path: str | os.PathLike, *, base_spec: str | None = None, key: bytes | str | None = None,
         **base_kwargs) -> Path:
    """Save a model made by `fxprune.compress`/`prune_with_plan` (see module docstring).

    `base_spec` ("torchvision:resnet50", "package.module:factory") says how `load` builds the base
    model; it defaults to the spec the model was built from by fxprune's CLI/zoo, or, for a
    torchvision model built in Python, the torchvision builder whose default model has its layout.
    With `key`, the recipe is signed (HMAC-SHA256) and `load` needs the same key.
    """
    from safetensors.torch import save as to_safetensors

    recipe = getattr(slim, "fxprune_recipe", None)
    if recipe is None:
        raise ArtifactError("this module has no fxprune recipe: save models returned by fxprune.compress "
                            "or fxprune.prune_with_plan")
    recipe = json.loads(json.dumps(recipe))
    if base_spec is not None:
        recipe["base"].update(spec=base_spec, kwargs=base_kwargs)
    elif not recipe["base"].get("spec") and recipe["base"].get("fingerprint"):
        recipe["base"]["spec"] = infer_torchvision_spec(recipe["base"].get("cls", ""), recipe["base"]["fingerprint"])
    path = Path(path)
    weights = to_safetensors(_tensors(slim))
    report = getattr(slim, "fxprune_report", None)
    recipe.update(
        versions={"fxprune": _version(), "torch": torch.__version__, "torchvision": torchvision.__version__},
        weights={"file": WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
        report=None if report is None else report.summary(),
        check={"seed": CHECK_SEED, "outputs": output_fingerprint(slim, recipe)},
    )
    recipe = _seal(recipe, _key(key))
    atomic_write(path / WEIGHTS, weights)
    atomic_write(path / SHAPES, shape_summary(slim).encode())
    atomic_write(path / RECIPE, json.dumps(recipe, indent=1, allow_nan=False).encode())
    return path


def _version() -> str:
    return __version__


def read_recipe(path: Path, *, key: bytes | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """The recipe at `path`, its seal checked and every field validated (module docstring)."""
    file = path / RECIPE
    if not file.is_file():
        raise ArtifactError(f"{file} is missing: {path} is not an fxprune artifact, or its save was interrupted")
    if file.stat().st_size > MAX_RECIPE_BYTES:
        raise ArtifactError(f"{file} is {file.stat().st_size} bytes, more than any recipe: not an fxprune artifact")
    try:
        recipe = json.loads(file.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{file} is truncated or corrupted ({exc}); save the model again") from exc
    if not isinstance(recipe, dict):
        raise ArtifactError(f"{file} is not a JSON object: not an fxprune recipe")
    missing = {"format", "base", "inputs", "plan", "groups", "weights"} - set(recipe)
    if missing:
        raise ArtifactError(f"{file} lacks {sorted(missing)}: not a complete fxprune recipe")
    if recipe["format"] != RECIPE_FORMAT:
        raise ArtifactError(f"{file} has recipe format {recipe['format']!r}; this fxprune reads format "
                            f"{RECIPE_FORMAT}: save the model again with this version")
    _check_seal(recipe, key, file)
    return validate(recipe, max_bytes=max_bytes)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _warn_versions(recipe: dict) -> None:
    here = {"fxprune": _version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    differ = [f"{k} {recipe['versions'][k]} -> {v}" for k, v in here.items()
              if k in recipe.get("versions", {}) and recipe["versions"][k] != v]
    if differ:
        warnings.warn(f"this artifact was saved with other versions ({'; '.join(differ)}); its outputs are checked "
                      "against the recorded fingerprint", ArtifactVersionWarning, stacklevel=3)


def _read_weights(path: Path, recipe: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as from_safetensors

    folder = path.resolve()
    file = (path / recipe["weights"]["file"]).resolve()
    if file.parent != folder:
        raise ArtifactError(f"weights file {recipe['weights']['file']!r} is outside the artifact folder")
    if not file.is_file():
        raise ArtifactError(f"{file} is missing: the artifact is incomplete")
    if file.stat().st_size != recipe["weights"]["bytes"]:
        raise ArtifactError(f"{file} has {file.stat().st_size} bytes, expected {recipe['weights']['bytes']}: "
                            "the file is truncated or corrupted")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != recipe["weights"]["sha256"]:
        raise ArtifactError(f"{file} does not match the checksum in {RECIPE}: the file is truncated or corrupted")
    try:
        return from_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{file} is not a valid safetensors file ({exc})") from exc


def _base_model(recipe: dict, trust_code: bool, max_bytes: int) -> nn.Module:
    spec = recipe["base"].get("spec")
    if not spec:
        raise ArtifactError(f"the recipe does not say how to build its base model ({recipe['base'].get('cls')}): "
                            "pass base_model=, or save with base_spec='package.module:factory'")
    try:
        return build_trusted(spec, recipe["base"].get("kwargs", {}), trust_code=trust_code, max_bytes=max_bytes)
    except ConfigError as exc:
        raise ArtifactError(f"cannot build the base model {spec!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - an allow-listed builder refusing recorded kwargs
        raise ArtifactError(f"building the base model {spec!r} with {recipe['base'].get('kwargs')} failed "
                            f"({type(exc).__name__}: {exc})") from exc


def load(path: str | os.PathLike, base_model: nn.Module | None = None, device: str | torch.device = "cpu", *,
         trust_code: bool = False, key: bytes | str | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
         check_outputs: bool = True) -> nn.Module:
    """Rebuild a saved slim model (see module docstring); `base_model` is not modified.

    Args:
        base_model: the model the artifact was made from (its weights are replaced); needed when
            the recipe's base spec is not allow-listed and `trust_code` is False.
        trust_code: allow the recipe's spec to import and run any module or Python file it names.
        key: the key the artifact was signed with (`save(..., key=)`).
        max_bytes: refuse recorded inputs, base models and weight files larger than this.
        check_outputs: recompute the output fingerprint recorded at save time and compare.
    """
    path = Path(path)
    key = _key(key)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ConfigError(f"max_bytes={max_bytes!r} must be a positive integer")
    if base_model is not None and not isinstance(base_model, nn.Module):
        raise ConfigError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
    recipe = read_recipe(path, key=key, max_bytes=max_bytes)
    _warn_versions(recipe)
    tensors = _read_weights(path, recipe)
    slim = copy.deepcopy(base_model) if base_model is not None else _base_model(recipe, trust_code, max_bytes)
    submodule = recipe["base"].get("submodule")
    if submodule:  # only this part was pruned (a detector's backbone); the rest is kept whole
        parent, _, attr = submodule.rpartition(".")
        try:
            owner = slim.get_submodule(parent) if parent else slim
            part = getattr(owner, attr)
        except AttributeError as exc:
            raise ArtifactError(f"the base model has no submodule {submodule!r}") from exc
        setattr(owner, attr, replay(recipe, part, trust_code=trust_code))
    else:
        slim = replay(recipe, slim, trust_code=trust_code)
    expected = slim.state_dict()
    if set(expected) != set(tensors):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ArtifactError(f"weights do not match the rebuilt model: unexpected {extra[:5]}, missing {missing[:5]}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(tensors[k].shape) or v.dtype != tensors[k].dtype:
            raise ArtifactError(f"weight {k} has shape {list(tensors[k].shape)} {tensors[k].dtype} in the file but "
                                f"{list(v.shape)} {v.dtype} in the rebuilt model")
    slim.load_state_dict(tensors, strict=True)
    if check_outputs and recipe.get("check"):
        _compare_fingerprint(recipe["check"]["outputs"], output_fingerprint(slim, recipe, recipe["check"]["seed"]),
                             DTYPES_BY_NAME.get(recipe.get("dtype", "float32"), torch.float32))
    recipe = {k: v for k, v in recipe.items() if k not in ("versions", "weights", "report", "check", "checksum",
                                                            "signature")}
    if isinstance(slim, torch.fx.GraphModule):
        preserve_through_deepcopy(slim, fxprune_recipe=recipe)
    else:  # a detector whose backbone was pruned: a plain module keeps its attributes through deepcopy
        slim.fxprune_recipe = recipe
    return slim.to(device)
