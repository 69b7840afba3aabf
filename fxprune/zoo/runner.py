"""Run a zoo: one worker process per model, several at once, each under a time and memory limit.

A hang, crash or out-of-memory costs that model only: the parent kills it (its whole process
group), records why, and goes on. Finished models (a result file exists) are skipped on restart,
and the report is rewritten atomically after every model, so an interrupted run always leaves a
consistent report of what finished.

The output directory records the options that shape a result (`run.json`): resuming with other
options is refused unless `force=True` discards the old results. While a run writes to the
directory it holds `run.lock` (`fcntl.flock`), so two runs never convert the same model at once.
Workers die with the parent: each runs in its own process group with a parent-death signal
(Linux `PR_SET_PDEATHSIG`) and watches a pipe from the parent; SIGINT/SIGTERM in the parent kill
every worker's process group and raise `ZooInterrupted` once the report of what finished is written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import atomic_write
from ..errors import ConfigError
from .catalog import ZooEntry
from .report import write_report

# the options that change a model's result, with the command-line flag that sets each
RESULT_OPTIONS = {"method": "--method", "flops": "--flops", "round_to": "--round-to",
                  "min_channels": "--min-channels", "min_ratio": "--min-ratio", "checks": "--checks",
                  "latency": "--no-latency", "grouped": "--grouped", "heads": "--heads", "layernorm": "--layernorm"}
# an option missing from an older run.json had this value (the run predates the option)
_DEFAULTS = {"round_to": None, "min_channels": 1, "min_ratio": 0.0, "checks": [], "latency": True, "grouped": "whole",
             "heads": "whole", "layernorm": "boundary"}
_OUTPUTS = ("results", "work", "logs", "jobs", "artifacts")

# The worker's first lines, run before `import fxprune` pulls in torch (seconds): die with the parent.
_BOOT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    try:\n"
    "        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "    except Exception:\n"
    "        pass\n"
    "if os.getppid() != int(sys.argv[2]):\n"
    "    os._exit(1)  # the parent died before the signal was armed\n"
    "from fxprune.zoo.worker import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class ZooInterrupted(KeyboardInterrupt):
    """A zoo run stopped by SIGINT or SIGTERM; every finished result is kept, rerun to resume."""

    def __init__(self, done: int, total: int, signum: int = signal.SIGINT):
        self.done, self.total, self.signum = done, total, signum
        super().__init__(f"interrupted: {done}/{total} done; rerun the same command to resume")


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


def _signal_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker leads its group: this takes its children too
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: subprocess.Popen) -> None:
    _signal_group(proc)
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

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def check_limits(jobs, timeout_s, max_memory_gb) -> None:
    """ConfigError unless jobs is an integer >= 1, timeout_s > 0 and max_memory_gb None or > 0."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be an integer >= 1 (got {jobs!r})")
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"--timeout must be a number of seconds > 0 (got {timeout_s!r})")
    if max_memory_gb is not None and (not isinstance(max_memory_gb, (int, float)) or not max_memory_gb > 0):
        raise ConfigError(f"--max-memory must be a number of GiB > 0 (got {max_memory_gb!r})")


def run_zoo(entries: list[ZooEntry], out: Path, options: dict, *, jobs: int = 1, timeout_s: float = 900,
            max_memory_gb: float | None = None, retry_failed: bool = False, progress: bool = True,
            force: bool = False) -> list[dict]:
    """Convert `entries` into `out` (see module docstring); returns the report rows.

    Raises ConfigError when `out` holds results made with other options (unless `force`) or another
    run is writing to it, and ZooInterrupted on SIGINT/SIGTERM (after killing the workers)."""
    check_limits(jobs, timeout_s, max_memory_gb)
    out = Path(out)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("model names in a zoo run must be unique")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _claim(out, entries, options, force)
        for sub in _OUTPUTS:
            (out / sub).mkdir(parents=True, exist_ok=True)
        return _run(entries, out, options, jobs, timeout_s, max_memory_gb, retry_failed, progress)


def _run(entries, out, options, jobs, timeout_s, max_memory_gb, retry_failed, progress) -> list[dict]:
    names = [e.name for e in entries]
    pending = [e for e in entries if not _finished(out, e.name, retry_failed)]
    bar = Progress(len(entries), out, progress)
    bar.done = len(entries) - len(pending)
    limit = None if max_memory_gb is None else max_memory_gb * 2**30
    limits = {"timeout_s": timeout_s, "max_memory": None if limit is None or math.isinf(limit) else int(limit)}
    running: list[_Running] = []
    stop: list[int] = []
    watch_r, watch_w = os.pipe()  # the workers see EOF on watch_r once this process is gone
    with _stop_signals(stop):
        try:
            while (pending or running) and not stop:
                while pending and len(running) < jobs and not stop:
                    running.append(_start(pending.pop(0), out, options, limits, watch_r))
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
                    bar.show(running, jobs, f"{r.entry.name}: {row['status']}"
                             + (f" ({row.get('error', '')[:80]})" if row["status"] != "ok" else ""))
                bar.show(running, jobs)
        finally:  # whatever stops the loop, no worker outlives it
            for r in running:
                _signal_group(r.proc)
            for r in running:
                r.proc.wait()
                r.log.close()
            os.close(watch_w)
            os.close(watch_r)
            bar.close()
    rows = write_report(out, names)
    if stop:
        raise ZooInterrupted(bar.done, len(entries), stop[0])
    return rows


@contextmanager
def _stop_signals(stop: list):
    """SIGINT and SIGTERM end the loop (appending the signal to `stop`) instead of raising mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def _locked(out: Path):
    """Hold `out/run.lock` for the run; another run into the same directory is refused."""
    import fcntl

    fd = os.open(out / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(f"{out} is in use by another fxprune zoo run (pid {holder}): wait for it to "
                              "finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting run)


def result_options(options: dict) -> dict:
    """The options that shape a result, with defaults filled in, as JSON would give them back."""
    chosen = {key: options.get(key, _DEFAULTS.get(key)) for key in RESULT_OPTIONS}
    chosen["checks"] = list(chosen["checks"] or [])
    return json.loads(json.dumps(chosen))


def _show(key: str, value) -> str:
    if key == "checks":
        return ",".join(value or []) or "''"
    if key == "latency":
        return "on" if value else "off"
    return str(value)


def _claim(out: Path, entries: list[ZooEntry], options: dict, force: bool) -> None:
    """Record this run's options in `out/run.json`; refuse (unless `force`) when results made with
    other options are there, discard them when `force`."""
    record = out / "run.json"
    has_results = any((out / "results").glob("*.json"))
    try:
        old = json.loads(record.read_text())
    except FileNotFoundError:
        old = None
    except json.JSONDecodeError:
        old = {}
    new = {"options": result_options(options),
           "models": {e.name: json.loads(json.dumps(e.to_json())) for e in entries}}
    if has_results and not force:
        fix = "pass --force to discard them and redo every model, or choose another --out"
        if not isinstance(old, dict) or not isinstance(old.get("options"), dict):
            raise ConfigError(f"{out} holds results of a run whose options are not recorded (run.json is "
                              f"{'missing' if old is None else 'unreadable'}): {fix}")
        differences = _differences(old, new, out)
        if differences:
            raise ConfigError(f"{out} holds results made with other options ({'; '.join(differences)}): {fix}")
    if force:
        for sub in _OUTPUTS:
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("report.json", "report.md"):
            (out / name).unlink(missing_ok=True)
    elif old and has_results:
        earlier = old.get("models") if isinstance(old.get("models"), dict) else {}
        new["models"] = {**earlier, **new["models"]}  # models of earlier selections stay
    atomic_write(record, json.dumps(new, indent=1).encode())


def _differences(old: dict, new: dict, out: Path) -> list[str]:
    before = old["options"]
    # an option a run recorded before it existed had its default value
    found = [f"{flag} {_show(key, before.get(key, _DEFAULTS.get(key)))} → {_show(key, new['options'][key])}"
             for key, flag in RESULT_OPTIONS.items() if before.get(key, _DEFAULTS.get(key)) != new["options"][key]]
    models = old.get("models") if isinstance(old.get("models"), dict) else {}
    for name, entry in new["models"].items():
        if name in models and models[name] != entry and (out / "results" / f"{name}.json").exists():
            earlier = models[name] if isinstance(models[name], dict) else {}
            changed = [k for k in entry if earlier.get(k) != entry[k]]
            found.append(f"model {name}: " + ", ".join(f"{k} {earlier.get(k)} → {entry[k]}" for k in changed))
    return found


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


def _start(entry: ZooEntry, out: Path, options: dict, limits: dict, watch_fd: int) -> _Running:
    job = out / "jobs" / f"{entry.name}.json"
    atomic_write(job, json.dumps({"entry": entry.to_json(), "options": options, "out": str(out),
                                  "limits": limits}).encode())
    (out / "results" / f"{entry.name}.json").unlink(missing_ok=True)
    log = open(out / "logs" / f"{entry.name}.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(options.get("threads", 1)))
    proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(job), str(os.getpid()), str(watch_fd)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, pass_fds=(watch_fd,), env=env)
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
