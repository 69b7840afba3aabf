"""Model specs for the CLI: ``torchvision:resnet50``, ``timm:resnet50``, ``fxprune:resnet20`` or
``package.module:factory`` / ``path/to/file.py:factory``.

Models are always built with random weights (``weights=None`` and, where the builder takes one,
``weights_backbone=None``): fxprune never downloads.

Two trust levels. A spec the user types (CLI, zoo listings) may import any module: it is their own
code. A spec read from a file (an artifact's recipe) is data: `build_trusted` builds only what the
allow-list names, torchvision's and timm's registries by name, fxprune's own nets and the specs or
builders the caller registered in this process with `register_builder`, and sizes the model on the
meta device before it allocates anything. Anything else needs the caller's explicit trust.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError
from .nets import INPUT_SHAPE, NETS

# torchvision classification models that expect something other than 224x224 RGB
_INPUT_SIZES = {"inception_v3": 299}


_SOURCES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_REGISTERED: dict[str, Callable[..., nn.Module] | None] = {}
_NO_DOWNLOAD = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def register_builder(spec: str, builder: Callable[..., nn.Module] | None = None) -> str:
    """Trust `spec` in artifacts loaded by this process.

    ``register_builder("mypkg.nets:tiny")`` lets `fxprune.load` import ``mypkg.nets`` for that spec;
    ``register_builder("tiny", make_tiny)`` makes the spec ``"tiny"`` build with `make_tiny`. Returns
    the spec, to pass as `fxprune.save(..., base_spec=...)`.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"register_builder needs a spec string, got {spec!r}")
    if builder is not None and not callable(builder):
        raise ConfigError(f"register_builder({spec!r}, ...): the builder must be callable")
    _REGISTERED[spec] = builder
    return spec


def is_trusted(spec: str) -> bool:
    """Whether an artifact may name `spec` without the caller's explicit trust (module docstring)."""
    source, sep, name = spec.partition(":")
    if spec in _REGISTERED:
        return True
    if not sep or not name:
        return False
    if source == "torchvision":
        import torchvision

        return name in torchvision.models.list_models()
    if source == "fxprune":
        return name in NETS
    if source == "timm":
        try:
            import timm
        except ImportError:
            return False
        return name in timm.list_models()
    return False


def build_trusted(spec: str, kwargs: dict, *, trust_code: bool = False, max_bytes: int | None = None) -> nn.Module:
    """Build `spec` as `build_model` does, if it is allow-listed or `trust_code` (module docstring);
    with `max_bytes`, the parameters and buffers are counted on the meta device first."""
    if not trust_code and not is_trusted(spec):
        raise ConfigError(f"{spec!r} is not an allow-listed model builder (torchvision/timm registries by name, "
                          "fxprune nets, fxprune.register_builder): pass base_model=, register the builder, "
                          "or pass trust_code=True if you trust the artifact's author")
    if max_bytes is not None:
        try:
            with torch.device("meta"):
                sized = _build(spec, dict(kwargs))
        except Exception as exc:  # noqa: BLE001 - a builder that cannot run on meta is built for real
            if kwargs:  # only the builder's defaults are known to be a sensible size
                raise ConfigError(f"cannot size {spec} with {kwargs} before building it ({type(exc).__name__}: "
                                  f"{exc}); pass base_model=") from exc
        else:
            size = sum(t.numel() * t.element_size() for t in (*sized.parameters(), *sized.buffers()))
            if size > max_bytes:
                raise ConfigError(f"{spec} with {kwargs} would take {size / 2**30:.1f} GiB, above the limit of "
                                  f"{max_bytes / 2**30:.1f} GiB: pass a larger max_bytes= if this is intended")
    return build_model(spec, **kwargs)


def model_source(model: nn.Module) -> dict | None:
    """How `model` was built, when `build_model` built it (recipes replay it)."""
    return _SOURCES.get(model)


def build_model(spec: str, **kwargs) -> nn.Module:
    """Build `spec` with random weights; remembers the spec so artifacts can rebuild it."""
    model = _build(spec, kwargs)
    _SOURCES[model] = {"spec": spec, "kwargs": dict(kwargs)}
    return model


def _build(spec: str, kwargs: dict) -> nn.Module:
    if _REGISTERED.get(spec) is not None:
        return _module_of(spec, _REGISTERED[spec](**kwargs))
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ConfigError(f"model spec {spec!r} must look like 'torchvision:resnet50' or 'package.module:factory'")
    downloads = sorted(k for k in _NO_DOWNLOAD if kwargs.get(k) not in (None, False))
    if downloads:
        raise ConfigError(f"{spec}: {', '.join(downloads)} must be None/False: fxprune builds models with random "
                          "weights and never downloads; load your weights into the model yourself")
    if source == "torchvision":
        import torchvision

        try:
            builder = torchvision.models.get_model_builder(name)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"torchvision has no model named {name!r}; see torchvision.models.list_models()") from exc
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs = {**kwargs, "weights_backbone": None}  # detection/segmentation: no ImageNet backbone download
        return builder(**{**kwargs, "weights": None})
    if source == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ConfigError(f"{spec} needs timm: pip install timm") from exc
        return timm.create_model(name, **{**kwargs, "pretrained": False})
    if source == "fxprune":
        if name not in NETS:
            raise ConfigError(f"fxprune has no built-in model {name!r}; choose from {', '.join(NETS)}")
        return NETS[name](**kwargs)
    factory = resolve_attribute(source, name)
    model = factory(**kwargs) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if isinstance(model, tuple):  # a zoo listing entry: (builder, input_shape)
        model = model[0](**kwargs)
    return _module_of(spec, model)


def _module_of(spec: str, model) -> nn.Module:
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


def shape_digest(model: nn.Module) -> str:
    """sha256 of every parameter's and buffer's name, shape and dtype: which architecture this is."""
    import hashlib

    text = "".join(f"{k}:{tuple(v.shape)}:{v.dtype};" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()


def infer_torchvision_spec(class_path: str, digest: str) -> str | None:
    """The torchvision spec whose default model has this class and state-dict layout, if exactly one
    has (so `fxprune.load` can rebuild a ``torchvision.models.resnet50()`` built in Python)."""
    if not class_path.startswith("torchvision.models."):
        return None
    import torchvision

    found = []
    for name in torchvision.models.list_models():
        ret = torchvision.models.get_model_builder(name).__annotations__.get("return")
        if not isinstance(ret, type) or f"{ret.__module__}.{ret.__qualname__}" != class_path:
            continue
        try:
            with torch.device("meta"):
                candidate = _build(f"torchvision:{name}", {})
        except Exception:  # noqa: BLE001 - a builder that cannot run on meta is no candidate
            continue
        if shape_digest(candidate) == digest:
            found.append(f"torchvision:{name}")
    return found[0] if len(found) == 1 else None
