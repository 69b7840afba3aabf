"""Convert one zoo model in its own process: ``python -m fxprune.zoo.worker JOB.json``.

The job file names the model (a `ZooEntry`), the compression options and the output directory.
The worker writes its current stage to ``work/NAME.stage`` (the parent's progress bar reads it),
the artifact to ``artifacts/NAME/`` and, last, its result to ``results/NAME.json`` — all
atomically, so a killed worker leaves no result and the model is simply redone on resume.

Started by the runner as ``JOB.json PARENT_PID WATCH_FD``, it dies with the parent: a Linux
parent-death signal (SIGKILL, armed before torch is imported) and, as a portable backstop, a thread
that kills the worker's process group once the parent's pipe `WATCH_FD` reaches EOF or the parent
pid changes. The job's ``limits`` are applied here too: an address-space limit (RLIMIT_AS) of the
worker's size after its imports plus ``max_memory`` bytes (and 128 MiB per torch thread for stacks
and malloc arenas), so an allocation past the limit fails at once (status ``memory``) instead of
waiting for the parent's resident-memory guard, and an alarm that ends the worker if it outlives
its timeout by a minute (the parent normally kills its whole process group first).
"""
from __future__ import annotations

import json
import math
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from ..api import compress
from ..artifacts import atomic_write, save
from ..export import check_exports
from ..latency import median_latency_ms
from ..models import build_model
from ..passes.inputs import ExampleInputs
from ..verify import randomize_degenerate_weights


class Stages:
    def __init__(self, out: Path, name: str):
        self.file = out / "work" / f"{name}.stage"
        self.current = "start"

    def __call__(self, stage: str) -> None:
        self.current = stage
        atomic_write(self.file, stage.encode())


def _inputs(entry: dict) -> ExampleInputs:
    gen = torch.Generator().manual_seed(0)
    return ExampleInputs(tuple(torch.randn(s, generator=gen) for s in entry["input_shapes"]), {})


def _allocation_failure(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "Cannot allocate memory" in text


def convert(job: dict) -> dict:
    entry, opts, out = job["entry"], job["options"], Path(job["out"])
    max_memory = (job.get("limits") or {}).get("max_memory")
    name = entry["name"]
    stage = Stages(out, name)
    result = {"model": name, "task": entry["task"], "status": "failed", "stage": "build"}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        torch.set_num_threads(opts.get("threads", 1))
        stage("build")
        model = build_model(entry["spec"], **entry["build_kwargs"]).eval()
        if entry["task"] != "user":
            randomize_degenerate_weights(model)  # random weights: make the verification meaningful
        target = model.get_submodule(entry["submodule"]) if entry["submodule"] else model
        inputs = _inputs(entry)
        stage("compress")
        slim = compress(target, opts["method"], inputs, opts["flops"], round_to=opts.get("round_to"),
                        min_channels=opts.get("min_channels", 1), min_ratio=opts.get("min_ratio", 0.0),
                        grouped=opts.get("grouped", "whole"), heads=opts.get("heads", "whole"),
                        layernorm=opts.get("layernorm", "boundary"))
        convert_s = time.perf_counter() - start
        report = slim.fxprune_report.summary()
        result.update(report=report, convert_s=convert_s)
        if opts.get("latency", True):
            stage("latency")
            result["latency_ms"] = [median_latency_ms(target, inputs), median_latency_ms(slim, inputs)]
        stage("exports")
        result["exports"] = check_exports(slim, inputs, opts.get("checks", ()))
        stage("save")
        _save(model, slim, entry, out / "artifacts" / name)
        result.update(status="ok", stage="done")
    except Exception as exc:  # noqa: BLE001 - one model's failure is its row in the report
        text = str(exc).strip()
        result.update(stage=stage.current, error=f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}",
                      traceback=traceback.format_exc(limit=8))
        if max_memory and _allocation_failure(exc):
            result.update(status="memory", error=f"over the memory limit ({max_memory / 2**30:g} GiB) in stage "
                                                 f"{stage.current}: {result['error']}")
    result["total_s"] = time.perf_counter() - start
    return result


def _save(model, slim, entry: dict, path: Path) -> None:
    if not entry["submodule"]:
        save(slim, path, base_spec=entry["spec"], **entry["build_kwargs"])
        return
    parent, _, attr = entry["submodule"].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, slim)
    recipe = json.loads(json.dumps(slim.fxprune_recipe))
    recipe["base"].update(spec=entry["spec"], kwargs=entry["build_kwargs"], submodule=entry["submodule"])
    model.fxprune_recipe = recipe
    model.fxprune_report = slim.fxprune_report
    save(model, path)


def _die_with_parent(parent: int, watch_fd: int) -> None:
    """Kill this worker's process group when the parent is gone (see the module docstring)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - the pipe below still watches
            pass

    def die() -> None:
        group = os.getpgrp()
        if group == os.getpid():  # our own group (the runner starts us in a new session)
            os.killpg(group, signal.SIGKILL)
        os._exit(1)

    def watch() -> None:
        fd = watch_fd
        while True:
            if fd is None:
                time.sleep(1.0)
            else:
                try:
                    ready, _, _ = select.select([fd], [], [], 1.0)
                    if ready and not os.read(fd, 1):
                        die()  # EOF: the parent's end is closed
                except OSError:
                    fd = None  # no usable pipe: poll the parent pid only
            if os.getppid() != parent:
                die()

    if os.getppid() != parent:
        die()
    threading.Thread(target=watch, name="fxprune-parent-watch", daemon=True).start()


def _apply_limits(limits: dict, threads: int = 1) -> None:
    max_memory = limits.get("max_memory")
    if max_memory:
        try:
            import resource

            with open("/proc/self/status") as f:
                size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            # plus room for the stacks and malloc arenas of torch's threads (reserved, hardly resident)
            cap = size + int(max_memory) + max(1, int(threads)) * 128 * 2**20
            cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
            cap = cap if soft == resource.RLIM_INFINITY else min(cap, soft)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        except (ImportError, OSError, StopIteration, ValueError):
            pass  # no /proc or no RLIMIT_AS: the parent's resident-memory guard still applies
    timeout = limits.get("timeout_s")
    if timeout and math.isfinite(timeout) and hasattr(signal, "alarm"):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(min(int(math.ceil(timeout)) + 60, 2**31 - 1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_file = Path(argv[0])
    if len(argv) >= 3:
        _die_with_parent(int(argv[1]), int(argv[2]))
    job = json.loads(job_file.read_text())
    _apply_limits(job.get("limits") or {}, job["options"].get("threads", 1))
    result = convert(job)
    out = Path(job["out"])
    atomic_write(out / "results" / f"{job['entry']['name']}.json", json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
