"""fxprune: a torch.fx compiler that turns a trained CNN into a genuinely slimmer nn.Module.

    >>> slim = fxprune.compress(model, method="l1", example_inputs=x, flops=0.5)
"""
from fxprune.passes.plan import PruningPlan

from . import data  # noqa: F401 - `fxprune.data.mnist(...)` works after `import fxprune`
from .analysis import ModelAnalysis, analyze
from .api import DATA_FREE_METHODS, compress, prune_with_plan
from .artifacts import ArtifactVersionWarning, load, save
from .errors import (
    ArtifactError,
    ConfigError,
    FxpruneError,
    InputError,
    LatencyUnreachableError,
    NothingToPruneError,
    TargetUnreachableError,
    TraceError,
    VerificationError,
)
from .methods import METHODS, register_method
from .models import register_builder
from .passes.inputs import ExampleInputs
from .passes.tracer import TracedModel, register_leaf_module, trace
from .report import CompressionReport
from .tensor_cores import TensorCoreWarning
from .version import __version__

__all__ = [
    "__version__", "DATA_FREE_METHODS", "METHODS", "ArtifactError", "ArtifactVersionWarning", "CompressionReport", "ConfigError", "ExampleInputs", "FxpruneError", "InputError", "LatencyUnreachableError",
    "ModelAnalysis", "NothingToPruneError", "PruningPlan", "TargetUnreachableError", "TensorCoreWarning", "TraceError", "TracedModel",
    "VerificationError", "analyze", "compress", "load", "prune_with_plan", "register_builder", "register_method", "register_leaf_module", "save", "trace",
]
