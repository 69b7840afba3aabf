"""Every pruning method behind one protocol (`base.Method`), registered by name.

    magnitude/        l1, l2, bn_scale, random, uniform: importance criteria as objects (data-free)
    gate_decorator/   gated BN, Taylor importance, Tick-Tock (needs data)
    gal/              soft masks + adversarial learning + FISTA, label-free (needs data)
    metapruning/      PruningNet + evolutionary search under FLOPs/params/latency (needs data)
    selection.py      ranking under the FLOPs budget, shared by the methods that rank units

`fxprune.compress(model, method=name, ...)` looks the name up here; `register_method(obj)` adds one.
"""
from .base import (
    METHODS,
    Method,
    MethodContext,
    MethodResult,
    get_method,
    make_options,
    register_method,
)
from .gal import GALMethod, GALOptions
from .gate_decorator import GateDecoratorMethod, GateDecoratorOptions
from .magnitude import (
    MAGNITUDE_METHODS,
    BNScale,
    Criterion,
    MagnitudeMethod,
    Norm,
    RandomScore,
)
from .metapruning import MetaPruningMethod, MetaPruningOptions

for _method in (*MAGNITUDE_METHODS, GateDecoratorMethod(), GALMethod(), MetaPruningMethod()):
    register_method(_method)

__all__ = ["BNScale", "Criterion", "GALMethod", "GALOptions", "GateDecoratorMethod", "GateDecoratorOptions", "METHODS",
           "MagnitudeMethod", "MetaPruningMethod", "MetaPruningOptions", "Method", "MethodContext", "MethodResult",
           "Norm", "RandomScore", "get_method", "make_options", "register_method"]
