"""Peak memory of a block of code, above what was in use when it started, in MiB.

On the CPU the kernel keeps each process's peak resident set size (``VmHWM`` in
``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current size
(Linux >= 4.0), so the peak of just the block is exact, whatever allocator made the memory (torch's
C++ allocations are invisible to `tracemalloc`). Where that file cannot be written, a thread samples
the resident size every millisecond instead (``method`` says which). On CUDA the caching allocator's
own peak counter is used.

Example::

    >>> import torch
    >>> from benches.harness.memory import PeakMemory
    >>> with PeakMemory() as peak:
    ...     x = torch.ones(64, 1024, 1024)   # 256 MiB
    >>> peak.mib >= 200
    True
"""
from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Give memory freed earlier back to the OS first, so the peak is not hidden inside it (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager; after the block, ``mib`` is the peak above the starting level, ``method`` how
    it was taken."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.mib: float | None = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        _release_free_heap()
        self._start = _status_kib("VmRSS")
        self._sampler = None
        if self._start is None:
            self.method = "unavailable (no /proc/self/status)"
        elif _reset_peak():
            self.method = "VmHWM after clear_refs"
        else:
            self.method = "VmRSS sampled every 1 ms"
            self._peak, self._stop = self._start, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            rss = _status_kib("VmRSS")
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return
        if self._start is None:
            return
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._peak, _status_kib("VmRSS") or 0)
        else:
            peak = _status_kib("VmHWM") or self._start
        self.mib = max(peak - self._start, 0) / 1024
