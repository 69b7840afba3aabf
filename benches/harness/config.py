"""What one benchmark run measures: models, FLOPs targets, round_to, batches, device, repeats.

Example::

    >>> from benches.harness.config import BenchConfig
    >>> cfg = BenchConfig(models=["resnet18"], flops=(0.5,), batches=(1,))
    >>> cfg.validate().specs
    ['torchvision:resnet18']
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from fxprune.errors import ConfigError
from fxprune.latency import EXTRA_ROUNDS, MIN_WARMUP, SPREAD_LIMIT, WARMUP_LIMIT, LatencyMeasurer
from fxprune.models import default_input_shape

# the models of issue 8, in the order the tables list them
DEFAULT_MODELS = (
    "resnet18", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_large", "densenet121", "efficientnet_b0",
    "regnet_y_800mf", "convnext_tiny", "shufflenet_v2_x1_0", "googlenet", "inception_v3",
)
# the slowest to time at batch 32 on a 2-core CPU: fewer latency repeats (the doc says so)
HEAVY_MODELS = ("inception_v3", "densenet121", "convnext_tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_spec(name: str) -> str:
    """``resnet50`` -> ``torchvision:resnet50``; specs with a source (``fxprune:resnet20``) stay."""
    return name if ":" in name else f"torchvision:{name}"


def short_name(spec: str) -> str:
    return spec.split(":", 1)[1] if spec.startswith(("torchvision:", "fxprune:")) else spec


@dataclass
class BenchConfig:
    models: list = field(default_factory=lambda: list(DEFAULT_MODELS))
    flops: tuple = (0.5, 0.3)  # fractions of the original FLOPs to keep
    round_to: tuple = (None, 8)
    batches: tuple = (1, 32)
    threads: int = 2
    devices: tuple = ("cpu", "cuda")  # CUDA is skipped, with a message, where there is none
    dtypes: tuple = ()  # default: float32 on the CPU; float32 and bfloat16 on CUDA
    torch_compile: tuple = ()  # default: (False,) on the CPU; (False, True) on CUDA
    compile_repeats: int = 5  # compile-speed repeats (median)
    method_repeats: int = 3  # method-pass repeats per data-free method
    latency_repeats: int = 7
    heavy_latency_repeats: int = 3
    cuda_latency_repeats: int = 30
    warmup: int = 2  # warm-up calls per model; at least fxprune.latency.MIN_WARMUP are made
    # a latency whose repeats spread (IQR / median) more than this, or whose warm-up median is more
    # than latency_max_warmup_ratio x off the steady median, is measured again (latency_extra_rounds
    # times at most, warm-up doubled each) and else reported as unstable, with no speedup
    latency_max_spread: float = SPREAD_LIMIT
    latency_max_warmup_ratio: float = WARMUP_LIMIT
    latency_extra_rounds: int = EXTRA_ROUNDS
    compare: bool = True  # Torch-Pruning side by side (when installed)
    kernels: bool = False  # the masked-convolution kernel benchmarks (when present)
    plots: bool = True  # PNG plots (when matplotlib is installed)
    input_shapes: dict = field(default_factory=dict)  # spec or name -> (1, C, H, W); default: the model's
    heavy_models: tuple = HEAVY_MODELS
    # fxprune vs Torch-Pruning slim model timed pair by pair (first FLOPs target, largest batch, CPU):
    # the goal's "no worse than Torch-Pruning" needs more than two round-robin medians
    head_to_head_models: tuple = ("resnet50",)
    head_to_head_pairs: int = 9

    def validate(self) -> "BenchConfig":
        if not self.models:
            raise ConfigError("no models to benchmark: pass --models, e.g. --models resnet18,resnet50")
        for f in self.flops:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                raise ConfigError(f"flops target {f!r} must be a fraction in (0, 1), e.g. 0.5")
        for r in self.round_to:
            if r is not None and (not isinstance(r, int) or r < 1):
                raise ConfigError(f"round_to {r!r} must be a positive integer or None")
        for b in self.batches:
            if not isinstance(b, int) or b < 1:
                raise ConfigError(f"batch size {b!r} must be a positive integer")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads={self.threads!r} must be a positive integer")
        bad = set(self.devices) - {"cpu", "cuda"}
        if bad or not self.devices:
            raise ConfigError(f"devices={list(self.devices)!r}: choose cpu and/or cuda")
        unknown = set(self.dtypes) - set(DTYPES)
        if unknown:
            raise ConfigError(f"unknown dtypes {sorted(unknown)}: choose from {', '.join(DTYPES)}")
        for n in (self.compile_repeats, self.method_repeats, self.latency_repeats, self.heavy_latency_repeats,
                  self.cuda_latency_repeats, self.head_to_head_pairs):
            if not isinstance(n, int) or n < 1:
                raise ConfigError(f"repeats must be positive integers (got {n!r})")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r} must be an integer >= 0")
        if not isinstance(self.latency_extra_rounds, int) or self.latency_extra_rounds < 0:
            raise ConfigError(f"latency_extra_rounds={self.latency_extra_rounds!r} must be an integer >= 0")
        if not (isinstance(self.latency_max_spread, (int, float)) and self.latency_max_spread > 0):
            raise ConfigError(f"latency_max_spread={self.latency_max_spread!r} must be a positive fraction, e.g. 0.2")
        if not (isinstance(self.latency_max_warmup_ratio, (int, float)) and self.latency_max_warmup_ratio >= 1):
            raise ConfigError(f"latency_max_warmup_ratio={self.latency_max_warmup_ratio!r} must be >= 1, e.g. 2")
        return self

    @property
    def specs(self) -> list[str]:
        return [model_spec(m) for m in self.models]

    def dtype_names(self, device: str) -> tuple:
        return self.dtypes or (("float32", "bfloat16") if device == "cuda" else ("float32",))

    def compile_modes(self, device: str) -> tuple:
        return self.torch_compile or ((False, True) if device == "cuda" else (False,))

    def input_shape(self, spec: str) -> tuple:
        shape = self.input_shapes.get(spec) or self.input_shapes.get(short_name(spec))
        return tuple(shape) if shape else default_input_shape(spec)

    def latency_repeats_for(self, spec: str, device: str) -> int:
        if device == "cuda":
            return self.cuda_latency_repeats
        return self.heavy_latency_repeats if short_name(spec) in self.heavy_models else self.latency_repeats

    @property
    def warmup_calls(self) -> int:
        """Warm-up calls per model before the first timed round (at least `MIN_WARMUP`)."""
        return max(self.warmup, MIN_WARMUP)

    def latency_measurer(self, repeats: int) -> LatencyMeasurer:
        """The measurer (warm-up, stability bounds, re-measurement) every latency of the run uses."""
        return LatencyMeasurer(repeats=repeats, warmup=self.warmup, min_warmup=MIN_WARMUP,
                               max_spread=self.latency_max_spread, max_warmup_ratio=self.latency_max_warmup_ratio,
                               extra_rounds=self.latency_extra_rounds)

    def to_json(self) -> dict:
        d = asdict(self)
        d["models"] = self.specs
        return d
