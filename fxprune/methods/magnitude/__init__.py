"""Data-free magnitude pruning: importance criteria as objects, one method that ranks by them."""
from .criteria import BNScale, Criterion, Norm, RandomScore
from .method import MAGNITUDE_METHODS, MagnitudeMethod

__all__ = ["BNScale", "Criterion", "MAGNITUDE_METHODS", "MagnitudeMethod", "Norm", "RandomScore"]
