"""What the numbers were measured on: machine, versions, date, threads and load.

CPU timings on a shared machine are only as good as the machine was quiet, so the suite records
the 1-minute load average next to every table and can wait for a quiet moment first.

`REPO` is the repository this harness sits in (``benches/harness/`` is never installed, so its own
location finds the checkout); every function that reads the repository takes a ``root`` instead
(``python -m benches.harness --root DIR``).

Example::

    >>> from benches.harness.machine import machine_info
    >>> info = machine_info()
    >>> info["cores"] >= 1 and "torch" in info["versions"]
    True
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit(root: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return 0.0


def machine_info(root: Path = REPO) -> dict:
    """Date, platform, CPU, cores, versions, the git commit of `root`, load average, CUDA device."""
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for dist in ("torchvision", "fxprune", "torch-pruning", "matplotlib"):
        v = _version(dist)
        if v is not None:
            versions[dist] = v
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "versions": versions,
        "git_commit": _git_commit(root),
        "load_average": load_average(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def wait_until_quiet(max_wait_s: float, threshold: float = 1.0, poll_s: float = 15.0, log=print) -> dict:
    """Poll the load average until it is below `threshold` or `max_wait_s` has passed.

    Returns what happened (waited seconds, load at the end, whether it got quiet), for the report.
    """
    start = time.monotonic()
    load = load_average()
    while load >= threshold and time.monotonic() - start < max_wait_s:
        log(f"waiting for a quiet machine: load {load:.2f} >= {threshold} "
            f"({time.monotonic() - start:.0f}/{max_wait_s:.0f} s)")
        time.sleep(min(poll_s, max(0.0, max_wait_s - (time.monotonic() - start))))
        load = load_average()
    return {"waited_s": round(time.monotonic() - start, 1), "load_average": load, "quiet": load < threshold,
            "threshold": threshold}
