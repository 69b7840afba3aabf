"""The recipe's schema, checked field by field before `load` allocates, imports or builds anything.

An artifact is data from wherever the user got it. Every field of `recipe.json` is checked for
its type and its bounds here: recorded input shapes against a byte budget (a forged shape must not
make `load` allocate 120 GB), dtypes against a fixed list (never `getattr(torch, name)` on a
string from the file), the weights file name confined to the artifact folder, keep indices inside
their group and strictly increasing, structure references as (node name, operand index) pairs.
Every violation is one ArtifactError naming the field and what it should be; nothing raw escapes.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from .errors import ArtifactError

DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128")}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")  # an fx node name or a dotted attribute path
_SPEC = re.compile(r"[^\x00-\x1f]{1,500}")
MAX_RANK = 8
MAX_TEXT = 1000
TOP_LEVEL = {"format", "base", "inputs", "dtype", "training", "trace", "ignore", "grouped", "heads", "layernorm", "groups", "plan", "weights",
             "versions", "report", "checksum", "signature", "check"}


def fail(field: str, what: str) -> ArtifactError:
    return ArtifactError(f"recipe.json field {field} {what}: the artifact is damaged or was edited; save it again")


def _expect(value: Any, kind, field: str, what: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise fail(field, f"must be {what}, got {type(value).__name__}")
    return value


def _text(value: Any, field: str, pattern: re.Pattern | None = None, *, optional: bool = False) -> str | None:
    if optional and value is None:
        return None
    _expect(value, str, field, "a string")
    if len(value) > MAX_TEXT or (pattern is not None and not pattern.fullmatch(value)):
        raise fail(field, f"is not a valid value ({value[:80]!r})")
    return value


def _int(value: Any, field: str, low: int = 0, high: int = 2**62) -> int:
    _expect(value, int, field, "an integer")
    if not low <= value <= high:
        raise fail(field, f"is {value}, outside [{low}, {high}]")
    return value


def _scalar(value: Any, field: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(field, "must be finite")
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise fail(field, f"must be a JSON scalar (bool, number, string or null), got {type(value).__name__}")
    if isinstance(value, str):
        _text(value, field)
    return value


def _dtype(value: Any, field: str) -> torch.dtype:
    if not isinstance(value, str) or value not in DTYPES:
        raise fail(field, f"names dtype {value!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[value]


def _inputs(data: Any, max_bytes: int) -> None:
    _expect(data, dict, "inputs", "an object")
    if set(data) != {"args", "kwargs"}:
        raise fail("inputs", "must have exactly the keys args and kwargs")
    values = [(f"inputs.args[{i}]", v) for i, v in enumerate(_expect(data["args"], list, "inputs.args", "a list"))]
    kwargs = _expect(data["kwargs"], dict, "inputs.kwargs", "an object")
    values += [(f"inputs.kwargs.{_text(k, 'inputs.kwargs key', _NAME)}", v) for k, v in kwargs.items()]
    if len(values) > 64:
        raise fail("inputs", f"has {len(values)} entries (at most 64)")
    total = 0
    for field, v in values:
        _expect(v, dict, field, "an object")
        if set(v) == {"value"}:
            _scalar(v["value"], field + ".value")
            continue
        if set(v) != {"tensor"} or not isinstance(v["tensor"], dict) or set(v["tensor"]) != {"shape", "dtype"}:
            raise fail(field, "must be {'tensor': {'shape': [...], 'dtype': ...}} or {'value': scalar}")
        shape = _expect(v["tensor"]["shape"], list, field + ".tensor.shape", "a list")
        if not 0 <= len(shape) <= MAX_RANK:
            raise fail(field + ".tensor.shape", f"has rank {len(shape)} (at most {MAX_RANK})")
        numel = math.prod(_int(s, field + ".tensor.shape", 1, 2**31) for s in shape)
        total += numel * _dtype(v["tensor"]["dtype"], field + ".tensor.dtype").itemsize
    if total > max_bytes:
        raise ArtifactError(f"the recorded example inputs take {total / 2**20:.0f} MiB, above the limit of "
                            f"{max_bytes / 2**20:.0f} MiB: the recipe was edited, or pass a larger max_bytes= to load")


def _selector(value: Any, field: str) -> None:
    if isinstance(value, str):
        _text(value, field)
        return
    _expect(value, dict, field, "a module name or {'type': 'package.module.Class'}")
    if set(value) != {"type"}:
        raise fail(field, "must have exactly the key type")
    _text(value["type"], field + ".type", _NAME)


def _base(base: Any) -> None:
    _expect(base, dict, "base", "an object")
    unknown = set(base) - {"spec", "kwargs", "cls", "submodule", "fingerprint"}
    if unknown:
        raise fail("base", f"has unknown keys {sorted(unknown)}")
    _text(base.get("spec"), "base.spec", _SPEC, optional=True)
    _text(base.get("cls", ""), "base.cls")
    _text(base.get("submodule"), "base.submodule", _NAME, optional=True)
    _text(base.get("fingerprint"), "base.fingerprint", _HEX64, optional=True)
    kwargs = _expect(base.get("kwargs", {}), dict, "base.kwargs", "an object")
    for k, v in kwargs.items():
        _text(k, "base.kwargs key", re.compile(r"[A-Za-z_][A-Za-z0-9_]*"))
        items = v if isinstance(v, list) else [v]
        if len(items) > 1000:
            raise fail(f"base.kwargs.{k}", "is too long")
        for item in items:
            _scalar(item, f"base.kwargs.{k}")


def _plan(plan: Any, groups: list) -> None:
    _expect(plan, dict, "plan", "an object")
    if set(plan) != {"keep", "remove_branches", "drop_concat_inputs", "fold_scales", "scale_inputs"}:
        raise fail("plan", "must have exactly keep, remove_branches, drop_concat_inputs, fold_scales and "
                   "scale_inputs")
    keep = _expect(plan["keep"], dict, "plan.keep", "an object")
    for key, kept in keep.items():
        if not (isinstance(key, str) and key.isdigit()) or int(key) >= len(groups):
            raise fail("plan.keep", f"names group {key!r}; the recipe has groups 0..{len(groups) - 1}")
        n_units = groups[int(key)][0]
        field = f"plan.keep.{key}"
        _expect(kept, list, field, "a list of channel indices")
        if not kept:
            raise fail(field, "is empty: every group keeps at least one unit")
        for i in kept:
            _int(i, field, 0, n_units - 1)
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise fail(field, "must be strictly increasing")
    for name in ("remove_branches", "drop_concat_inputs"):
        for i, ref in enumerate(_expect(plan[name], list, f"plan.{name}", "a list")):
            field = f"plan.{name}[{i}]"
            if not (isinstance(ref, list) and len(ref) == 2):
                raise fail(field, "must be a [node name, operand index] pair")
            _text(ref[0], field, _NAME)
            _int(ref[1], field, 0, 100_000)
    for i, name in enumerate(_expect(plan["fold_scales"], list, "plan.fold_scales", "a list")):
        _text(name, f"plan.fold_scales[{i}]", _NAME)
    for i, edit in enumerate(_expect(plan["scale_inputs"], list, "plan.scale_inputs", "a list")):
        field = f"plan.scale_inputs[{i}]"
        if not (isinstance(edit, list) and len(edit) == 3):
            raise fail(field, "must be a [node name, operand index, scale] triple")
        _text(edit[0], field, _NAME)
        _int(edit[1], field, 0, 100_000)
        if isinstance(edit[2], bool) or not isinstance(edit[2], (int, float)) or not math.isfinite(edit[2]):
            raise fail(field, "must have a finite number as its scale")


def _groups(groups: Any) -> list:
    _expect(groups, list, "groups", "a list")
    for i, g in enumerate(groups):
        field = f"groups[{i}]"
        if not (isinstance(g, list) and len(g) == 3):
            raise fail(field, "must be [units, leading tensor, dim]")
        _int(g[0], field, 1, 2**31)
        _text(g[1], field, _NAME)
        _int(g[2], field, 0, MAX_RANK)
    return groups


def _check(check: Any) -> None:
    _expect(check, dict, "check", "an object")
    if set(check) != {"seed", "outputs"}:
        raise fail("check", "must have exactly seed and outputs")
    _int(check["seed"], "check.seed", 0, 2**31)
    for i, out in enumerate(_expect(check["outputs"], list, "check.outputs", "a list")):
        field = f"check.outputs[{i}]"
        _expect(out, dict, field, "an object")
        if set(out) != {"path", "shape", "norm", "absmax", "nonfinite"}:
            raise fail(field, "must have exactly path, shape, norm, absmax and nonfinite")
        _text(out["path"], field + ".path")
        for s in _expect(out["shape"], list, field + ".shape", "a list"):
            _int(s, field + ".shape")
        for key in ("norm", "absmax"):
            if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or not math.isfinite(out[key]):
                raise fail(f"{field}.{key}", "must be a finite number")
        _int(out["nonfinite"], field + ".nonfinite")


def validate(recipe: Any, *, max_bytes: int) -> dict:
    """`recipe` if every field is well-formed and within bounds (see module docstring)."""
    _expect(recipe, dict, "(top level)", "an object")
    unknown = set(recipe) - TOP_LEVEL
    if unknown:
        raise fail("(top level)", f"has unknown keys {sorted(unknown)[:5]}")
    _base(recipe["base"])
    _inputs(recipe["inputs"], max_bytes)
    _dtype(recipe.get("dtype", "float32"), "dtype")
    _expect(recipe.get("training", False), bool, "training", "true or false")
    trace = _expect(recipe.get("trace", {"leaf_modules": [], "concrete_args": {}}), dict, "trace", "an object")
    if set(trace) != {"leaf_modules", "concrete_args"}:
        raise fail("trace", "must have exactly leaf_modules and concrete_args")
    for i, entry in enumerate(_expect(trace["leaf_modules"], list, "trace.leaf_modules", "a list")):
        _selector(entry, f"trace.leaf_modules[{i}]")
    for k, v in _expect(trace["concrete_args"] or {}, dict, "trace.concrete_args", "an object").items():
        _text(k, "trace.concrete_args key", _NAME)
        _scalar(v, f"trace.concrete_args.{k}")
    for i, entry in enumerate(_expect(recipe.get("ignore", []), list, "ignore", "a list")):
        _selector(entry, f"ignore[{i}]")
    if recipe.get("grouped", "whole") not in ("whole", "equal", "auto"):
        raise fail("grouped", "must be one of 'whole', 'equal', 'auto'")
    if recipe.get("heads", "whole") not in ("whole", "width", "auto"):
        raise fail("heads", "must be one of 'whole', 'width', 'auto'")
    if recipe.get("layernorm", "boundary") not in ("boundary", "prune"):
        raise fail("layernorm", "must be one of 'boundary', 'prune'")
    _plan(recipe["plan"], _groups(recipe["groups"]))
    weights = _expect(recipe["weights"], dict, "weights", "an object")
    if set(weights) != {"file", "sha256", "bytes"}:
        raise fail("weights", "must have exactly file, sha256 and bytes")
    name = _text(weights["file"], "weights.file", re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}"))
    if ".." in name:
        raise fail("weights.file", "must be a file name inside the artifact folder")
    _text(weights["sha256"], "weights.sha256", _HEX64)
    _int(weights["bytes"], "weights.bytes", 0, max_bytes)
    versions = _expect(recipe.get("versions", {}), dict, "versions", "an object")
    for k, v in versions.items():
        _text(k, "versions key")
        _text(v, f"versions.{k}")
    if recipe.get("check") is not None:
        _check(recipe["check"])
    return recipe
