"""What the compressed model must satisfy, as one typed value with one budget rule.

`compress(..., flops=, params=, latency=, round_to=, min_channels=, min_ratio=, blocks=)` builds a
`Constraints`; every method reads its budget from it (`macs_budget`, `fits_macs`), so "at most half
the FLOPs" means the same thing whichever method runs: the exactly recounted MACs at or under
`flops x original MACs`, with a relative slack of 1e-9 for float rounding of that product only
(`macs_limit`). Gate Decorator, GAL, MetaPruning and the selection all compare against it.

A method declares which constraints it honours (`Method.supports`); a constraint set to something
other than its default that the chosen method does not honour is a ConfigError, never silently
dropped.

Example::

    >>> c = Constraints(flops=0.5, round_to=8)
    >>> c.fits_macs(49, total=100), c.fits_macs(51, total=100)
    (True, False)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .arguments import compile_option, real_number, whole_number
from .errors import ConfigError

SLACK = 1e-9  # relative: the product flops x total is a float
DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "half": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float64": torch.float64, "double": torch.float64}


@dataclass(frozen=True)
class Constraints:
    """Limits on the compressed model; fractions are of the original model's count."""

    flops: float = 0.5  # fraction of the original FLOPs (= MACs) to keep at most, in (0, 1]
    params: float | None = None  # fraction of the original parameters to keep at most
    latency: float | None = None  # fraction of the original's measured latency, in (0, 1]
    latency_ms: float | None = None  # or an absolute limit, milliseconds per forward
    round_to: int | str | None = None  # kept channel counts are multiples of this; "auto": latency step edges
    min_channels: int = 1  # every group keeps at least this many channels
    min_ratio: float = 0.0  # ... and at least this fraction of them
    blocks: bool = False  # a latency target may remove whole residual blocks (their branch; the shortcut stays)

    def __post_init__(self):
        if isinstance(self.flops, bool) or not isinstance(self.flops, (int, float)) or not 0 < self.flops <= 1:
            raise ConfigError(
                f"flops={self.flops!r} must be the fraction of the original FLOPs to keep, in (0, 1] (e.g. 0.5)")
        if self.params is not None:
            real_number(self.params, "params", low=0, high=1, low_open=True, example="0.5")
        if self.latency is not None:
            real_number(self.latency, "latency", low=0, high=1, low_open=True,
                        example="0.5, the fraction of the original's measured latency to keep")
        if self.latency_ms is not None:
            real_number(self.latency_ms, "latency_ms", low=0, low_open=True, example="12.5 milliseconds")
            if self.latency is not None:
                raise ConfigError("give latency= (a fraction of the original's measured latency) or latency_ms= "
                                  "(milliseconds), not both")
        if self.round_to != "auto":
            whole_number(self.round_to, "round_to", optional=True)
        whole_number(self.min_channels, "min_channels")
        real_number(self.min_ratio, "min_ratio", low=0, high=1, high_open=True, example="0.1")
        if not isinstance(self.blocks, bool):
            raise ConfigError(f"blocks={self.blocks!r} must be True or False")
        if self.blocks and not self.has_latency:
            raise ConfigError("blocks=True lets a latency target remove whole residual blocks: give latency= "
                              "(a fraction of the measured original) or latency_ms=, or drop blocks=True")

    def macs_budget(self, total_macs: float) -> float:
        """The nominal budget, flops x the original MACs (for reports and steering)."""
        return self.flops * total_macs

    def macs_limit(self, total_macs: float) -> float:
        """The largest MACs count that fits: the one budget rule (module docstring)."""
        return self.flops * total_macs * (1 + SLACK)

    def fits_macs(self, macs: float, total: float) -> bool:
        return macs <= self.macs_limit(total)

    def params_limit(self, total_params: float) -> float | None:
        return None if self.params is None else self.params * total_params * (1 + SLACK)

    def fits_params(self, params: float, total: float) -> bool:
        return self.params is None or params <= self.params_limit(total)

    @property
    def has_latency(self) -> bool:
        return self.latency is not None or self.latency_ms is not None

    def latency_target_s(self, original_s: float) -> float | None:
        """The latency limit in seconds, given the original's measured seconds (for `latency=`)."""
        if self.latency_ms is not None:
            return self.latency_ms / 1000.0
        return None if self.latency is None else self.latency * original_s

    def set(self) -> frozenset[str]:
        """The names of the constraints that differ from their defaults (`flops` always counts;
        `latency_ms` counts as `latency`)."""
        default = Constraints()
        names = {f.name for f in dataclasses.fields(self)
                 if f.name != "flops" and getattr(self, f.name) != getattr(default, f.name)}
        return frozenset({"flops"} | {"latency" if n == "latency_ms" else n for n in names})

    def require_supported(self, method: str, supported: frozenset[str]) -> None:
        """ConfigError naming each set constraint `method` cannot honour."""
        missing = sorted(self.set() - supported - {"flops"})
        if missing:
            raise ConfigError(f"method {method!r} does not support {', '.join(missing)}: it honours "
                              f"{', '.join(sorted(supported | {'flops'}))}; drop the option or choose another method")

    @property
    def round_to_auto(self) -> bool:
        return self.round_to == "auto"

    def selection(self) -> dict:
        """The per-group channel rules, as keyword arguments of the selection and width encodings
        (`round_to="auto"` is resolved by the latency model, not by a fixed multiple)."""
        return {"round_to": None if self.round_to_auto else self.round_to, "min_channels": self.min_channels,
                "min_ratio": self.min_ratio}


@dataclass(frozen=True)
class MeasureOn:
    """Where and how a latency is measured: the device the model will run on, the batch size
    (None: the example inputs'), the dtype (None: the model's), NHWC activations, torch.compile
    (`compile`: None for eager, else the torch.compile mode; True is normalised to "default")."""

    device: str = "cpu"
    batch: int | None = None
    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool | str | None = None

    def __post_init__(self):
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: measure on 'cpu' or 'cuda' (or 'cuda:N')")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} but CUDA is not available here: measure where the model will "
                              "run, or use device='cpu'")
        whole_number(self.batch, "batch", optional=True)
        if isinstance(self.dtype, str):  # the names the CLI and profile_latency take
            name = self.dtype.lower().removeprefix("torch.")
            if name not in DTYPE_NAMES:
                raise ConfigError(f"dtype={self.dtype!r} is not a floating dtype name: one of {sorted(DTYPE_NAMES)}")
            object.__setattr__(self, "dtype", DTYPE_NAMES[name])
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ConfigError(f"dtype={self.dtype!r} must be a floating torch.dtype, e.g. torch.bfloat16")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"channels_last={self.channels_last!r} must be True or False")
        object.__setattr__(self, "compile", compile_option(self.compile))
