"""Per-op handlers of the dependency analysis and the rewrite, one small class per op kind.

Importing this package fills the registry; an op without a handler is a boundary.
"""
from . import (  # noqa: F401
    attention,
    conv,
    elementwise,
    linear,
    mvit_attention,
    norm,
    passthrough,
    reduce,
    reshape,
    slicing,
    window_attention,
)
from .registry import (
    OpHandler,
    handler_for,
    register_function,
    register_method,
    register_module,
)

__all__ = ["OpHandler", "handler_for", "register_function", "register_method", "register_module"]
