"""fxprune: a torch.fx compiler that turns a trained CNN into a genuinely slimmer nn.Module."""
from .errors import (
    ConfigError,
    FxpruneError,
    InputError,
    NothingToPruneError,
    TargetUnreachableError,
    TraceError,
    VerificationError,
)
from .inputs import ExampleInputs
from .tracer import TracedModel, register_leaf_module, trace

__version__ = "0.1.0"
from .api import METHODS, ModelAnalysis, analyze, compress, prune_with_plan
from .report import CompressionReport
