"""Which implementation runs a masked conv: measured once per call class, like ``cudnn.benchmark``.

Why measure: no single implementation wins everywhere. Convolving the gathered live filters and
writing them into a preallocated output is best at low density (by runs of channels: `gather`; or
one ``index_select`` over the live channels plus a zero plane: `gather_zero_row`); one dense conv
with the mask folded into the filters is best when nearly every channel is live (`dense`); channels_last
helps oneDNN and cuDNN on some shapes and hurts on others; the Triton kernel needs no host
synchronisation. Which is fastest depends on the device, dtype, shape and density, so the first call
of each class times every valid candidate (interleaved rounds, best round) and the winner is remembered
for the process (and, with ``FXPRUNE_KERNEL_CACHE_FILE=path.json``, on disk across processes).

A call class is (device and its name or thread count, dtype, input and filter shape, stride,
padding, dilation, groups, input layout, output and input-mask density in 1/16 steps, training or not).

`backend(name)` forces one implementation inside a block (for comparisons); where it is not valid
for a call (Triton on a CPU tensor without the interpreter, Triton not installed) the measured
choice runs instead. ``FXPRUNE_KERNEL_DISPATCH=heuristic`` skips measuring: dense at density
>= 0.9, else the gather path (Triton never), for runs that must not spend time timing; so does a
call class first met while a CUDA graph is being captured.

The backward always runs over the live channels (`gather.backward`): its cost falls with the
density, and at density 1 it is the dense backward. Its candidates (`BACKWARD_IMPLEMENTATIONS`:
cuDNN/oneDNN's convolution backward on the gathered tensors, or GEMMs for pointwise convs) are
measured the same way under their own call class (the forward's, plus "backward", which gradients
are needed and hard or soft mode).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..errors import InputError

IMPLEMENTATIONS = ("gather", "gather_cl", "gather_zero_row", "dense", "gemm", "dense_gemm", "triton")
BACKWARD_IMPLEMENTATIONS = ("conv", "gemm")  # the backward's candidates (`ops.masked_conv2d_backward`)
BACKENDS = ("auto",) + IMPLEMENTATIONS + ("conv",)  # "gemm" forces both passes, "conv" the backward
DENSITY_STEPS = 16
ROUNDS = 5
SAMPLE_S = 2e-3  # seconds of calls per timed sample
MAX_CALLS = 64

_state: dict = {"forced": None, "last": None, "last_backward": None, "disk_loaded": None}
_cache: dict[str, str] = {}


@contextlib.contextmanager
def backend(name: str):
    """Force an implementation inside the block: one of `BACKENDS` ("auto": measured). A name the
    forward does not have ("conv") forces only the backward; "gemm" forces both where it is valid."""
    if name not in BACKENDS:
        raise InputError(f"unknown masked-conv backend {name!r}: choose from {', '.join(BACKENDS)}")
    old, _state["forced"] = _state["forced"], None if name == "auto" else name
    try:
        yield
    finally:
        _state["forced"] = old


def forced() -> str | None:
    return _state["forced"]


def last() -> tuple[str, str] | None:
    """(call class, implementation) of the most recent forward (what a benchmark reports)."""
    return _state["last"]


def last_backward() -> tuple[str, str] | None:
    """(call class, implementation) of the last masked-conv backward (`BACKWARD_IMPLEMENTATIONS`)."""
    return _state["last_backward"]


def decisions() -> dict[str, str]:
    """Every call class measured in this process (or read from the disk cache) and its winner."""
    _load_disk()
    return dict(_cache)


def clear() -> None:
    """Forget the measured choices of this process (the disk cache file is left alone)."""
    _cache.clear()
    _state["last"] = _state["last_backward"] = None
    _state["disk_loaded"] = None


def _device_id(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()}threads"


def call_class(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, in_density: float | None,
               density: float, training: bool) -> str:
    """The key under which a measured choice is remembered."""
    layout = "nhwc" if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) else "nchw"
    bucket = round(density * DENSITY_STEPS)
    in_bucket = "none" if in_density is None else f"{round(in_density * DENSITY_STEPS)}/{DENSITY_STEPS}"
    return (f"{_device_id(x.device)}|{str(x.dtype).removeprefix('torch.')}|x{list(x.shape)}|w{list(weight.shape)}"
            f"|s{list(stride)}p{list(padding)}d{list(dilation)}g{groups}|{layout}|in_density={in_bucket}"
            f"|density={bucket}/{DENSITY_STEPS}|{'train' if training else 'eval'}")


def _cache_file() -> Path | None:
    path = os.environ.get("FXPRUNE_KERNEL_CACHE_FILE")
    return Path(path) if path else None


def _load_disk() -> None:
    path = _cache_file()
    if path is None or _state["disk_loaded"] == str(path):
        return
    _state["disk_loaded"] = str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if data.get("torch") == torch.__version__:
        known = IMPLEMENTATIONS + BACKWARD_IMPLEMENTATIONS
        _cache.update({k: v for k, v in data.get("choices", {}).items() if v in known})


def _save_disk() -> None:
    path = _cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"torch": torch.__version__, "choices": _cache}, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:  # a read-only cache location costs a re-measurement, nothing else
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runners: dict[str, Callable[[], Tensor]], device: torch.device,
            rounds: int = ROUNDS) -> tuple[str, Tensor, dict[str, float]]:
    """Time every runner (a warm-up call, then `rounds` interleaved rounds); the fastest by its best round.

    Each sample averages enough calls to last about `SAMPLE_S` (small layers take tens of
    microseconds, where one call is mostly timer and scheduler noise). The best round, not the
    median, is compared: other jobs on the machine only ever add time, so the minimum is the closest
    to each candidate's own cost. Returns the winner, its last output (so the measuring call costs
    no extra run) and the best times.
    """
    outputs: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    for name, fn in runners.items():  # warm-up: Triton compiles and autotunes, oneDNN builds primitives
        outputs[name] = fn()
        _sync(device)
        t0 = time.perf_counter()
        outputs[name] = fn()
        _sync(device)
        calls[name] = max(1, min(MAX_CALLS, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                outputs[name] = fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / calls[name])
    fastest = {name: min(t) for name, t in times.items()}
    best = min(fastest, key=fastest.get)
    return best, outputs[best], fastest


def _capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream: timing (which synchronises) would break
    the capture, so an undecided call class takes the heuristic's choice, unremembered."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def heuristic(candidates: list[str], density: float) -> str:
    """Dense at density >= 0.9, else the gather path; the first candidate where neither is one."""
    if density >= 0.9 and "dense" in candidates:
        return "dense"
    return "gather" if "gather" in candidates else candidates[0]


def run(key: str, runners: dict[str, Callable[[], Tensor]], device: torch.device, density: float,
        slot: str = "last"):
    """Run the implementation chosen for `key` among `runners` (the valid candidates), measuring once.

    `slot` names where the choice is recorded for `last()` (the forward) / `last_backward()`."""
    choice = _state["forced"]
    if choice not in runners:
        _load_disk()
        choice = _cache.get(key)
    if choice not in runners:
        if os.environ.get("FXPRUNE_KERNEL_DISPATCH") == "heuristic" or len(runners) == 1 or _capturing(device):
            choice = heuristic(list(runners), density) if len(runners) > 1 else next(iter(runners))
        else:
            choice, out, _ = measure(runners, device)
            _cache[key] = choice
            _save_disk()
            _state[slot] = (key, choice)
            return out
    _state[slot] = (key, choice)
    return runners[choice]()
