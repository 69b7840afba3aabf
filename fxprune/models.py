"""Model specs for the CLI: ``torchvision:resnet50`` or ``package.module:factory``.

Models are always built with random weights (``weights=None``): fxprune never downloads.
"""
from __future__ import annotations

import importlib
import weakref

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
    try:
        module = importlib.import_module(source)
        factory = getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {name!r} from {source!r}: {exc}") from exc
    model = factory(**kwargs) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} did not give an nn.Module (got {type(model).__name__})")
    return model


def default_input_shape(spec: str) -> tuple[int, ...]:
    name = spec.partition(":")[2]
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
