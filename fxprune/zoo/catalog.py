"""Which models a zoo run converts, how each is built, and what it is fed.

A `ZooEntry` is everything a worker process needs to rebuild one model on its own: a build spec
(`torchvision:NAME`, `package.module:factory`, `path/file.py:MODELS[name]`), build kwargs, the
example input shapes, and the submodule to prune when the whole model does not trace (a detector's
backbone).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..models import resolve_attribute

TASKS = ("classification", "segmentation", "detection", "video", "optical_flow")

# example input shapes by task, and the models that need another size
_TASK_SHAPES = {
    "classification": [(1, 3, 224, 224)],
    "segmentation": [(1, 3, 224, 224)],
    "detection": [(1, 3, 224, 224)],
    "video": [(1, 3, 16, 112, 112)],
    "optical_flow": [(1, 3, 128, 128), (1, 3, 128, 128)],
}
_MODEL_SHAPES = {
    "inception_v3": [(1, 3, 299, 299)],
    "ssd300_vgg16": [(1, 3, 300, 300)],
    "ssdlite320_mobilenet_v3_large": [(1, 3, 320, 320)],
    "s3d": [(1, 3, 16, 224, 224)],
    "mvit_v1_b": [(1, 3, 16, 224, 224)],
    "mvit_v2_s": [(1, 3, 16, 224, 224)],
    "swin3d_t": [(1, 3, 16, 224, 224)],
    "swin3d_s": [(1, 3, 16, 224, 224)],
    "swin3d_b": [(1, 3, 16, 224, 224)],
}


@dataclass
class ZooEntry:
    name: str
    task: str
    spec: str
    input_shapes: list
    build_kwargs: dict = field(default_factory=dict)
    submodule: str | None = None  # prune this part (detection: the backbone), keep the rest whole

    def to_json(self) -> dict:
        return asdict(self)


def _torchvision_entries(task: str) -> list[ZooEntry]:
    import torchvision

    module = torchvision.models if task == "classification" else getattr(torchvision.models, task)
    entries = []
    for name in torchvision.models.list_models(module=module):
        kwargs = {"weights_backbone": None} if task in ("segmentation", "detection") else {}
        shapes = _MODEL_SHAPES.get(name, _TASK_SHAPES[task])
        entries.append(ZooEntry(name, task, f"torchvision:{name}", [list(s) for s in shapes], kwargs,
                                "backbone" if task == "detection" else None))
    return entries


def user_entries(source: str) -> list[ZooEntry]:
    """Models listed by the user: `file.py` or `package.module` holding a dict `MODELS`
    (or `source:ATTR` naming another one) of name -> builder or (builder, input_shape).
    A file is recorded by its absolute path."""
    base, _, attr = source.rpartition(":") if ":" in source else (source, "", "MODELS")
    if base.endswith(".py"):  # the recipes name the file: make them work from any directory
        base = str(Path(base).resolve())
    listing = resolve_attribute(base, attr or "MODELS")
    if callable(listing) and not isinstance(listing, dict):
        listing = listing()
    if not isinstance(listing, dict) or not listing:
        raise ConfigError(f"{source} must hold a non-empty dict of name -> builder or (builder, input_shape)")
    entries = []
    for name, value in listing.items():
        shape = value[1] if isinstance(value, tuple) else (1, 3, 224, 224)
        shapes = [list(s) for s in shape] if shape and isinstance(shape[0], (tuple, list)) else [list(shape)]
        entries.append(ZooEntry(str(name), "user", f"{base}:{attr or 'MODELS'}[{name}]", shapes))
    return entries


def select(tasks=("classification",), patterns: str | None = None, source: str | None = None) -> list[ZooEntry]:
    """Entries of the given tasks (or the user's list), filtered by comma-separated name globs."""
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"unknown task {t!r}: choose from {', '.join(TASKS)}")
    entries = user_entries(source) if source else [e for t in tasks for e in _torchvision_entries(t)]
    if patterns:
        globs = [p.strip() for p in patterns.split(",") if p.strip()]
        entries = [e for e in entries if any(fnmatch.fnmatchcase(e.name, g) for g in globs)]
    if not entries:
        raise ConfigError(f"no model matches tasks={list(tasks)} models={patterns!r}"
                          + (f" source={source!r}" if source else ""))
    return entries
