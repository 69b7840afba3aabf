"""Gate Decorator (You et al., NeurIPS 2019): gated BN, Taylor importance, Tick-Tock."""
from .method import SCHEDULES, GateDecoratorMethod, GateDecoratorOptions, gate_decorator

__all__ = ["SCHEDULES", "GateDecoratorMethod", "GateDecoratorOptions", "gate_decorator"]
