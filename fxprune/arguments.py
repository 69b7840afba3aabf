"""Arguments checked at the door: a wrong type or a name that matches nothing is a ConfigError
naming the argument and the fix, before any work is done and never as a raw TypeError deep inside.

Module selectors (`ignore=`, `leaf_modules=`) accept one entry or a list of them: a qualified
module name (`"layer4"`, which also covers `layer4.0.conv1`), a glob (`"layer4.*.conv2"`), a module
type (`nn.MultiheadAttention`) or, for `ignore`, a module instance of the model. A single string is
one name, never a sequence of one-letter names. (`leaf_modules` takes exact names only.) A name or glob that matches no module of the model
is an error with the closest names, because a misspelt `ignore` silently prunes what the user meant
to protect.
"""
from __future__ import annotations

import difflib
import fnmatch
import numbers
from typing import Any, Iterable

from torch import nn

from .errors import ConfigError


def _matches(pattern: str, names: list[str], exact: bool) -> bool:
    if exact:
        return pattern in names
    if any(n == pattern or n.startswith(pattern + ".") for n in names):
        return True
    return any(ch in pattern for ch in "*?[") and any(fnmatch.fnmatchcase(n, pattern) for n in names)


def module_selectors(model: nn.Module, entries: Any, argument: str, *, instances: bool = True,
                     exact: bool = False) -> list:
    """`entries` as a list, each checked against `model` (see the module docstring). With `exact`
    (leaf_modules) a name must be a module's full qualified name: no globs, no prefixes."""
    if entries is None:
        return []
    if isinstance(entries, (str, type, nn.Module)):
        entries = [entries]
    elif not isinstance(entries, Iterable):
        raise ConfigError(f"{argument}={entries!r} must be a module name, a module type, or a list of them")
    entries = list(entries)
    names = [n for n, _ in model.named_modules() if n]
    members = {id(m) for m in model.modules()}
    for item in entries:
        if isinstance(item, str):
            if not item:
                raise ConfigError(f"{argument} has an empty module name: name a submodule, e.g. 'layer4'")
            if not _matches(item, names, exact):
                close = difflib.get_close_matches(item, names, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
                    f"; the model's top-level modules are {', '.join(repr(n) for n in names if '.' not in n)[:300]}")
                raise ConfigError(f"{argument}: no module of {type(model).__name__} is named {item!r}{hint}")
        elif isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise ConfigError(f"{argument} entry {item.__name__} is not an nn.Module subclass")
        elif instances and isinstance(item, nn.Module):
            if id(item) not in members:
                raise ConfigError(f"{argument} entry {type(item).__name__} instance is not a submodule of the model")
        else:
            kinds = "module names, types or submodule instances" if instances else "module names or types"
            raise ConfigError(f"{argument} entries must be {kinds}; got {item!r} ({type(item).__name__})")
    return entries


def real_number(value: Any, argument: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, example: str = "") -> float:
    """`value` as a float, checked to be a real number (not a bool) inside the given bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo}, {hi}" if lo and hi else (f" >= {low:g}" if lo else "")
        raise ConfigError(f"{argument}={value!r} must be a number{where}{f' (e.g. {example})' if example else ''}")
    return float(value)


def whole_number(value: Any, argument: str, *, low: int = 1, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{argument}={value!r} must be an integer >= {low}" + (" or None" if optional else ""))
    return int(value)


GROUPED = ("whole", "equal", "auto")


HEADS = ("whole", "width", "auto")
LAYERNORM = ("boundary", "prune")


# torch.compile modes a latency may be measured under (True: "default"). "reduce-overhead" records
# CUDA graphs: on a GPU whose eager forward is bound by the host issuing kernels, it is how a slim
# model's smaller kernels turn into a shorter forward. CUDA_GRAPH ("cuda-graph") is not a
# torch.compile mode: the eager forward is captured once in a torch.cuda.CUDAGraph and replayed
# (the eager kernels, no host launches, no compilation: seconds, where inductor takes minutes).
CUDA_GRAPH = "cuda-graph"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", CUDA_GRAPH)


def compile_option(value: Any) -> str | None:
    """`compile=`: False / None (eager), True ("default"), a torch.compile mode name or "cuda-graph"."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ConfigError(f"compile={value!r}: use False (eager), True or one of torch.compile's modes "
                      f"{', '.join(repr(m) for m in COMPILE_MODES)} (e.g. compile='reduce-overhead' for CUDA graphs, "
                      f"or {CUDA_GRAPH!r}: the eager forward captured in one CUDA graph, no compilation)")


def _one_of(name: str, value: Any, choices: tuple, described: str) -> str:
    """`value` when it is one of `choices`, else a ConfigError naming each choice (`described`)."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {described}")
    return value


def heads_option(value: Any) -> str:
    """`heads=`: how attention heads are pruned ("whole" heads, per-head "width", "auto")."""
    return _one_of("heads", value, HEADS, "'whole' (remove whole attention heads), 'width' (every head keeps the "
                   "same q/k and v positions) or 'auto' (width where a head is at least as wide as the number of "
                   "heads)")


def layernorm_option(value: Any) -> str:
    """`layernorm=`: whether a LayerNorm over the channel dim stays a "boundary" (its channels stay)
    or lets them be pruned ("prune": it normalises over the kept channels, not function-preserving)."""
    return _one_of("layernorm", value, LAYERNORM, "'boundary' (a LayerNorm over the channel dim keeps its channels, "
                   "the default) or 'prune' (the residual stream is pruned through LayerNorm, which then normalises "
                   "over the kept channels only: not function-preserving)")


def grouped_option(value: Any) -> str:
    """`grouped=`: how grouped convs are pruned ("whole" groups, an "equal" count per group, "auto")."""
    return _one_of("grouped", value, GROUPED, "'whole' (remove whole groups of grouped convs), 'equal' (every group "
                   "keeps the same channels) or 'auto' (equal where the groups are wide enough)")
