"""The masked-convolution kernel benchmarks (``benches/micro/bench_kernels.py``), when they exist.

They are pytest-benchmark tests owned by the kernels work; the suite runs them as they are, in a
child process (``pytest benches/micro/bench_kernels.py --benchmark-only --benchmark-json=...``), and
reads their JSON back, so it depends on nothing but their file. Where the ``fxprune.kernels``
package or the benchmark file is missing, the result says so and nothing runs.

Example::

    >>> from benches.harness.kernels import run_kernel_benchmarks
    >>> run_kernel_benchmarks(bench_file="/nonexistent/bench_kernels.py")["status"]
    'skipped'
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .machine import REPO

BENCH_FILE = Path("benches") / "micro" / "bench_kernels.py"  # relative to the repository root


def kernel_bench_file(root: Path = REPO) -> Path:
    """The kernel benchmark file of the repository at `root`."""
    return Path(root) / BENCH_FILE


def kernels_available(path: Path) -> tuple[bool, str]:
    if importlib.util.find_spec("fxprune.kernels") is None:
        return False, "the masked-convolution kernels (`fxprune.kernels`) are not in this checkout yet"
    if not Path(path).exists():
        return False, f"{path} does not exist"
    return True, str(path)


def run_kernel_benchmarks(bench_file=None, timeout_s: float = 1200, threads: int | None = None,
                          root: Path = REPO) -> dict:
    """{'status': 'ok', 'benchmarks': [{name, median_ms, min_ms, rounds, extra}], 'command'} or a skip/failure.

    `bench_file` defaults to `root`'s ``benches/micro/bench_kernels.py``; pytest runs in `root`."""
    root = Path(root)
    bench_file = Path(bench_file) if bench_file is not None else kernel_bench_file(root)
    ok, why = kernels_available(bench_file)
    if not ok:
        return {"status": "skipped", "message": why}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.json"
        cmd = [sys.executable, "-m", "pytest", str(bench_file), "--benchmark-only", f"--benchmark-json={out}",
               "-p", "no:cacheprovider", "-q", "-o", "addopts="]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "message": f"the kernel benchmarks ran past {timeout_s:.0f} s"}
        path = bench_file.resolve()
        shown_file = path.relative_to(root.resolve()) if path.is_relative_to(root.resolve()) else path
        shown = f"python -m pytest {shown_file} --benchmark-only"
        if not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            return {"status": "failed", "message": f"exit {proc.returncode}, no results: " + " | ".join(tail)}
        data = json.loads(out.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        stats = b.get("stats", {})
        extra = ", ".join(f"{k}={v}" for k, v in (b.get("extra_info") or {}).items())
        rows.append({"name": b.get("name"), "median_ms": 1000 * stats.get("median", 0.0),
                     "min_ms": 1000 * stats.get("min", 0.0), "rounds": stats.get("rounds"), "extra": extra})
    status = "ok" if rows else "failed"
    return {"status": status, "benchmarks": rows, "command": shown, "returncode": proc.returncode,
            "message": "" if rows else f"exit {proc.returncode}: no benchmark results"}
