"""Run a zoo: one worker process per model, several at once, each under a time and memory limit.

A hang, crash or out-of-memory costs that model only: the parent kills it (its whole process
group), records why, and goes on. Finished models (a result file exists) are skipped on restart,
and the report is rewritten atomically after every model, so an interrupted run always leaves a
consistent report of what finished.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import atomic_write
from .catalog import ZooEntry
from .report import write_report


@dataclass
class _Running:
    entry: ZooEntry
    proc: subprocess.Popen
    started: float
    log: object


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return total


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_log_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1][:200] if lines else ""


class Progress:
    """One status line: done/total, running models with their stage, ETA."""

    def __init__(self, total: int, out: Path, enabled: bool, stream=sys.stderr):
        self.total, self.out, self.enabled, self.stream = total, out, enabled, stream
        self.done, self.durations, self.start = 0, [], time.time()
        self.tty = stream.isatty()

    def stage(self, name: str) -> str:
        try:
            return (self.out / "work" / f"{name}.stage").read_text()
        except FileNotFoundError:
            return "start"

    def show(self, running: list[_Running], jobs: int, event: str | None = None) -> None:
        if not self.enabled:
            return
        left = self.total - self.done
        eta = ""
        if self.durations:
            eta = f" ETA {sum(self.durations) / len(self.durations) * left / max(jobs, 1):.0f}s"
        now = ", ".join(f"{r.entry.name}({self.stage(r.entry.name)})" for r in running)
        line = f"[{self.done}/{self.total}]{eta} {now}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if event:
                self.stream.write("\r\033[K" + event + "\n")
        elif event:
            self.stream.write(f"{line} | {event}\n")
        self.stream.flush()


def run_zoo(entries: list[ZooEntry], out: Path, options: dict, *, jobs: int = 1, timeout_s: float = 900,
            max_memory_gb: float | None = None, retry_failed: bool = False, progress: bool = True) -> list[dict]:
    """Convert `entries` into `out` (see module docstring); returns the report rows."""
    out = Path(out)
    for sub in ("results", "work", "logs", "jobs", "artifacts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("model names in a zoo run must be unique")
    pending = [e for e in entries if not _finished(out, e.name, retry_failed)]
    bar = Progress(len(entries), out, progress)
    bar.done = len(entries) - len(pending)
    limit = None if max_memory_gb is None else max_memory_gb * 2**30
    running: list[_Running] = []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(_start(pending.pop(0), out, options))
        time.sleep(0.2)
        for r in list(running):
            verdict = _check(r, timeout_s, limit)
            if verdict is None:
                continue
            running.remove(r)
            r.log.close()
            row = _result(out, r, verdict)
            bar.done += 1
            bar.durations.append(time.time() - r.started)
            write_report(out, names)
            bar.show(running, jobs, f"{r.entry.name}: {row['status']}" + (f" ({row.get('error', '')[:80]})"
                                                                         if row["status"] != "ok" else ""))
        bar.show(running, jobs)
    return write_report(out, names)


def _finished(out: Path, name: str, retry_failed: bool) -> bool:
    file = out / "results" / f"{name}.json"
    if not file.exists():
        return False
    if not retry_failed:
        return True
    try:
        return json.loads(file.read_text()).get("status") == "ok"
    except json.JSONDecodeError:
        return False


def _start(entry: ZooEntry, out: Path, options: dict) -> _Running:
    job = out / "jobs" / f"{entry.name}.json"
    atomic_write(job, json.dumps({"entry": entry.to_json(), "options": options, "out": str(out)}).encode())
    (out / "results" / f"{entry.name}.json").unlink(missing_ok=True)
    log = open(out / "logs" / f"{entry.name}.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(options.get("threads", 1)))
    proc = subprocess.Popen([sys.executable, "-m", "fxprune.zoo.worker", str(job)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return _Running(entry, proc, time.time(), log)


def _check(r: _Running, timeout_s: float, limit: float | None) -> str | None:
    """None while it runs well; else why it stopped ("exited", "timeout", "memory")."""
    if r.proc.poll() is not None:
        return "exited"
    if time.time() - r.started > timeout_s:
        _kill(r.proc)
        return "timeout"
    if limit is not None and _rss_bytes(r.proc.pid) > limit:
        _kill(r.proc)
        return "memory"
    return None


def _result(out: Path, r: _Running, verdict: str) -> dict:
    file = out / "results" / f"{r.entry.name}.json"
    if verdict == "exited" and file.exists():
        return json.loads(file.read_text())
    stage = (out / "work" / f"{r.entry.name}.stage")
    stage = stage.read_text() if stage.exists() else "start"
    error = {
        "timeout": f"timed out after {time.time() - r.started:.0f}s in stage {stage}",
        "memory": f"killed by the memory guard in stage {stage}",
        "exited": f"worker crashed (exit code {r.proc.returncode}) in stage {stage}: "
                  f"{_last_log_line(out / 'logs' / f'{r.entry.name}.log')}",
    }[verdict]
    row = {"model": r.entry.name, "task": r.entry.task, "status": "failed" if verdict == "exited" else verdict,
           "stage": stage, "error": error, "total_s": time.time() - r.started}
    atomic_write(file, json.dumps(row, indent=1).encode())
    return row
