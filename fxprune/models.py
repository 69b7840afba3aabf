"""Model specs for the CLI: ``torchvision:resnet50`` or ``package.module:factory``.

Models are always built with random weights (``weights=None``): fxprune never downloads.
"""
from __future__ import annotations

import importlib
import importlib.util
import weakref
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

# torchvision classification models that expect something other than 224x224 RGB
_INPUT_SIZES = {"inception_v3": 299}


_SOURCES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def model_source(model: nn.Module) -> dict | None:
    """How `model` was built, when `build_model` built it (recipes replay it)."""
    return _SOURCES.get(model)


def build_model(spec: str, **kwargs) -> nn.Module:
    """Build `spec` with random weights; remembers the spec so artifacts can rebuild it."""
    model = _build(spec, kwargs)
    _SOURCES[model] = {"spec": spec, "kwargs": dict(kwargs)}
    return model


def _build(spec: str, kwargs: dict) -> nn.Module:
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ConfigError(f"model spec {spec!r} must look like 'torchvision:resnet50' or 'package.module:factory'")
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"torchvision has no model named {name!r}; see torchvision.models.list_models()") from exc
    if source == "fxprune":
        from .nets import NETS

        if name not in NETS:
            raise ConfigError(f"fxprune has no built-in model {name!r}; choose from {', '.join(NETS)}")
        return NETS[name](**kwargs)
    factory = resolve_attribute(source, name)
    model = factory(**kwargs) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if isinstance(model, tuple):  # a zoo listing entry: (builder, input_shape)
        model = model[0](**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} did not give an nn.Module (got {type(model).__name__})")
    return model


def _import_source(source: str):
    """A module by import path, or a Python file by path (loaded under a private name)."""
    if source.endswith(".py"):
        path = Path(source).resolve()
        if not path.exists():
            raise ConfigError(f"model file {source} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"fxprune_user_{abs(hash(str(path)))}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        raise ConfigError(f"cannot import {source!r}: {exc}") from exc


def resolve_attribute(source: str, attr: str):
    """`attr` of `source`; `NAME[key]` indexes a dict attribute (zoo listings)."""
    module = _import_source(source)
    name, _, key = attr.partition("[")
    try:
        value = getattr(module, name)
        if key:
            value = value() if callable(value) and not isinstance(value, dict) else value
            value = value[key.rstrip("]")]
    except (AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot find {attr!r} in {source!r}: {exc}") from exc
    return value


def default_input_shape(spec: str) -> tuple[int, ...]:
    source, _, name = spec.partition(":")
    if source == "fxprune":
        from .nets import INPUT_SHAPE

        return INPUT_SHAPE
    size = _INPUT_SIZES.get(name, 224)
    return (1, 3, size, size)


def parse_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"--input-shape {text!r} must be comma-separated integers, e.g. 1,3,224,224")
    shape = tuple(int(p) for p in parts)
    if any(s <= 0 for s in shape):
        raise ConfigError(f"--input-shape {text!r} must be positive integers, e.g. 1,3,224,224")
    return shape


def example_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))
