"""`fxprune zoo` can be trusted with its output directory and its processes: a rerun with other
options never reuses old results silently, workers die with the parent (SIGKILL, SIGINT, SIGTERM),
two runs never share a directory, limits are validated and applied, model files are recorded by
their absolute path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fxprune
from fxprune.cli import main
from fxprune.models import build_model
from fxprune.zoo import ZooInterrupted, run_zoo, user_entries

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MODELS_PY = '''
import os, subprocess, sys, time
from collections import OrderedDict
from torch import nn


def tiny(width=4):
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, width, 3, padding=1), relu=nn.ReLU(),
                                     conv2=nn.Conv2d(width, 4, 1)))


def slow():
    time.sleep(float(os.environ.get("ZOO_SLOW_S", "600")))
    return tiny(6)


def hang_with_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["ZOO_CHILD_PID"], "w") as f:
        f.write(str(child.pid))
    time.sleep(600)


def show_limits():
    import resource
    with open(os.environ["ZOO_LIMITS"], "w") as f:
        size = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:")][0]
        f.write(f"{resource.getrlimit(resource.RLIMIT_AS)[0]} {size}")
    return tiny()


MODELS = {"fast": (tiny, (1, 3, 8, 8))}
PAIR = {"fast": (tiny, (1, 3, 8, 8)), "slow": (slow, (1, 3, 8, 8))}
TWO_SLOW = {"slow_a": (slow, (1, 3, 8, 8)), "slow_b": (slow, (1, 3, 8, 8))}
HANG = {"hang": (hang_with_child, (1, 3, 8, 8))}
LIMITS = {"limits": (show_limits, (1, 3, 8, 8))}
'''

QUICK = ["--checks", "", "--no-latency", "--quiet"]


@pytest.fixture
def models(tmp_path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS_PY)
    return path


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def _zoo_cmd(models: Path, attr: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fxprune.cli", "zoo", "--models-from", f"{models}:{attr}", "--out", str(out),
            *QUICK, *extra]


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()  # state, ppid, pgrp, ...
    except OSError:
        return None


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie is dead (its reaper may be lazy)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and int(stat[1]) == pid:
                kids.append(int(entry))
    return kids


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _stage(out: Path, name: str) -> str:
    try:
        return (out / "work" / f"{name}.stage").read_text()
    except FileNotFoundError:
        return ""


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# 1. a rerun with other options is refused; --force redoes; the same options resume


def test_rerun_with_other_options_is_refused_and_force_redoes(tmp_path, models, capsys):
    out = tmp_path / "z"
    base = ["zoo", "--models-from", str(models), "--out", str(out), *QUICK]
    assert main([*base, "--flops", "0.5", "--method", "l1"]) == 0
    result = out / "results" / "fast.json"
    first = json.loads(result.read_text())
    assert first["status"] == "ok" and first["report"]["macs_after"] > 0.3 * first["report"]["macs_before"]
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["options"]["flops"] == 0.5 and recorded["options"]["method"] == "l1"
    assert recorded["models"]["fast"]["spec"].startswith(str(models))
    stamp = result.stat().st_mtime_ns
    capsys.readouterr()

    assert main([*base, "--flops", "0.3", "--method", "random"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fxprune: error: ")
    assert "--method l1 → random" in err and "--flops 0.5 → 0.3" in err
    assert "--round-to" not in err  # only the options that differ are named
    assert "--force" in err and "another --out" in err
    assert result.stat().st_mtime_ns == stamp  # nothing was touched
    assert json.loads((out / "run.json").read_text()) == recorded

    assert main([*base, "--flops", "0.3", "--method", "random", "--force"]) == 0
    redone = json.loads(result.read_text())
    assert redone["status"] == "ok" and result.stat().st_mtime_ns != stamp
    assert redone["report"]["macs_after"] <= 0.3 * 1.01 * redone["report"]["macs_before"]
    assert json.loads((out / "run.json").read_text())["options"]["method"] == "random"
    assert json.loads((out / "report.json").read_text())[0]["report"] == redone["report"]

    stamp = result.stat().st_mtime_ns
    assert main([*base, "--flops", "0.3", "--method", "random", "--jobs", "2"]) == 0  # same options: resume
    assert result.stat().st_mtime_ns == stamp

    capsys.readouterr()
    assert main([*base, "--flops", "0.3", "--method", "random", "--no-latency", "--checks", "export"]) == 2
    assert "--checks '' → export" in capsys.readouterr().err

    (out / "run.json").unlink()  # results of a run that recorded nothing: not trusted either
    assert main([*base, "--flops", "0.3", "--method", "random"]) == 2
    assert "options are not recorded" in capsys.readouterr().err
    assert result.stat().st_mtime_ns == stamp


def test_a_model_built_from_another_file_is_not_reused(tmp_path, models, capsys):
    out = tmp_path / "z"
    assert main(["zoo", "--models-from", str(models), "--out", str(out), *QUICK]) == 0
    other = tmp_path / "other.py"
    other.write_text(MODELS_PY)
    capsys.readouterr()
    assert main(["zoo", "--models-from", str(other), "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "model fast: spec" in err and str(other) in err and "--force" in err


def test_models_from_a_relative_path_is_recorded_absolute(tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["zoo", "--models-from", "models.py", "--out", "z", *QUICK]) == 0
    assert user_entries("models.py")[0].spec == f"{models}:MODELS[fast]"
    job = json.loads((tmp_path / "z" / "jobs" / "fast.json").read_text())
    assert job["entry"]["spec"] == f"{models}:MODELS[fast]"
    recipe_files = [p for p in (tmp_path / "z" / "artifacts" / "fast").iterdir() if p.suffix == ".json"]
    assert any(f"{models}:MODELS[fast]" in p.read_text() for p in recipe_files)
    assert "models.py:MODELS" not in "".join(p.read_text().replace(str(models), "") for p in recipe_files)
    monkeypatch.chdir(ROOT)  # the recorded spec builds the base model from any directory
    base = build_model(job["entry"]["spec"])
    assert [name for name, _ in base.named_children()] == ["conv1", "relu", "conv2"]


# 3. limits are validated before anything runs


@pytest.mark.parametrize("flag, value, message", [
    ("--jobs", "0", "--jobs must be an integer >= 1 (got 0)"),
    ("--jobs", "-1", "--jobs must be an integer >= 1 (got -1)"),
])
def test_bad_jobs_fail_fast_with_a_typed_message(tmp_path, models, flag, value, message):
    out = tmp_path / "z"
    done = subprocess.run(_zoo_cmd(models, "MODELS", out, flag, value), env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"fxprune: error: {message}"
    assert not (out / "results").exists()


@pytest.mark.parametrize("args, message", [
    (["--timeout", "0"], "--timeout must be a number of seconds > 0 (got 0.0)"),
    (["--timeout", "-5"], "--timeout must be a number of seconds > 0 (got -5.0)"),
    (["--timeout", "nan"], "--timeout must be a number of seconds > 0 (got nan)"),
    (["--max-memory", "0"], "--max-memory must be a number of GiB > 0 (got 0.0)"),
    (["--max-memory", "-1"], "--max-memory must be a number of GiB > 0 (got -1.0)"),
    (["--threads", "0"], "--threads must be an integer >= 1 (got 0)"),
])
def test_bad_limits_are_refused(tmp_path, models, capsys, args, message):
    out = tmp_path / "z"
    assert main(["zoo", "--models-from", str(models), "--out", str(out), *QUICK, *args]) == 2
    assert capsys.readouterr().err.strip() == f"fxprune: error: {message}"
    assert not out.exists()


def test_run_zoo_validates_its_limits(tmp_path, models):
    entries = user_entries(str(models))
    for kwargs in ({"jobs": 0}, {"jobs": -1}, {"jobs": 1.5}, {"timeout_s": 0}, {"max_memory_gb": 0}):
        with pytest.raises(fxprune.ConfigError):
            run_zoo(entries, tmp_path / "z", {"method": "l1", "flops": 0.5}, **kwargs)
    assert not (tmp_path / "z").exists()


# 2. workers die with the parent; interrupts keep what finished; one run per directory


def test_workers_die_when_the_parent_is_killed(tmp_path, models):
    out = tmp_path / "z"
    proc = subprocess.Popen(_zoo_cmd(models, "TWO_SLOW", out, "--jobs", "2"), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        workers = _wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), 30, "two workers")
        for pid in workers:
            assert int(_stat(pid)[2]) == pid  # each worker leads its own process group
        _wait_for(lambda: _stage(out, "slow_a") == _stage(out, "slow_b") == "build", 30, "both building")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers), "workers outlived their parent"
    finally:
        _kill_all([proc.pid, *workers])
    # the lock died with the parent: a rerun goes ahead (and resumes, as both models are still to do)
    done = subprocess.run(_zoo_cmd(models, "TWO_SLOW", out, "--jobs", "2"), env=_env(ZOO_SLOW_S="0"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in json.loads((out / "report.json").read_text())] == ["ok", "ok"]


def test_worker_dies_when_the_parent_pipe_closes():
    """The portable backstop alone (no parent death): EOF on the pipe kills the worker's group."""
    read, write = os.pipe()
    code = ("import sys, time\nfrom fxprune.zoo.worker import _die_with_parent\n"
            "_die_with_parent(int(sys.argv[1]), int(sys.argv[2]))\nprint('armed', flush=True)\ntime.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), str(read)], pass_fds=(read,),
                             start_new_session=True, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        os.close(read)
        assert child.stdout.readline().strip() == "armed"
        os.close(write)
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_kills_the_workers_keeps_results_and_resumes(tmp_path, models, sig):
    out = tmp_path / "z"
    cmd = _zoo_cmd(models, "PAIR", out, "--jobs", "2")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        _wait_for(lambda: len(_children(proc.pid)) == 1 and (out / "results" / "fast.json").exists()
                  and _stage(out, "slow") == "build", 60, "fast done and slow building")
        workers = _children(proc.pid)
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 130
        assert stderr.strip() == "fxprune: interrupted: 1/2 done; rerun the same command to resume"
        assert "Traceback" not in stderr + stdout
        _wait_for(lambda: not any(_alive(p) for p in workers), 5, "the worker to die")
    finally:
        _kill_all([proc.pid, *workers])
    assert not (out / "results" / "slow.json").exists()
    assert [r["model"] for r in json.loads((out / "report.json").read_text())] == ["fast"]
    stamp = (out / "results" / "fast.json").stat().st_mtime_ns
    done = subprocess.run(cmd, env=_env(ZOO_SLOW_S="0"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["status"]) for r in rows] == [("fast", "ok"), ("slow", "ok")]
    assert (out / "results" / "fast.json").stat().st_mtime_ns == stamp  # kept, not redone


def test_run_zoo_raises_zoo_interrupted_and_leaves_no_worker(tmp_path, models):
    out = tmp_path / "z"
    entries = user_entries(f"{models}:TWO_SLOW")
    earlier = set(_children(os.getpid()))  # e.g. compile workers an earlier test in this process started
    started = time.time()

    def interrupt_soon(signum, frame):
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    old = signal.signal(signal.SIGALRM, interrupt_soon)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        with pytest.raises(ZooInterrupted) as info:
            run_zoo(entries, out, {"method": "l1", "flops": 0.5, "checks": [], "latency": False}, jobs=2,
                    progress=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.time() - started < 15
    assert (info.value.done, info.value.total) == (0, 2)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
    assert not any(_alive(p) for p in set(_children(os.getpid())) - earlier)
    assert json.loads((out / "report.json").read_text()) == []


def test_a_second_run_into_the_same_directory_is_refused(tmp_path, models, capsys):
    out = tmp_path / "z"
    proc = subprocess.Popen(_zoo_cmd(models, "PAIR", out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "run.json").exists(), 60, "the first run to start")
        assert main(["zoo", "--models-from", f"{models}:PAIR", "--out", str(out), *QUICK]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"fxprune: error: {out} is in use by another fxprune zoo run (pid {proc.pid}): wait for it "
                       "to finish, or choose another --out")
        assert main(["zoo", "--models-from", f"{models}:PAIR", "--out", str(out), *QUICK, "--force"]) == 2
        assert (out / "run.json").exists()  # --force discards nothing while another run holds the directory
    finally:
        proc.kill()
        proc.wait()


# limits are applied in the worker


def test_timeout_kills_the_whole_process_group(tmp_path, models):
    out = tmp_path / "z"
    child_pid_file = tmp_path / "child.pid"
    done = subprocess.run(_zoo_cmd(models, "HANG", out, "--timeout", "10"),
                          env=_env(ZOO_CHILD_PID=str(child_pid_file)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    row = json.loads((out / "results" / "hang.json").read_text())
    assert row["status"] == "timeout" and "stage build" in row["error"]
    child = int(child_pid_file.read_text())  # the builder's own subprocess, in the worker's group
    _wait_for(lambda: not _alive(child), 5, "the worker's child to die")


def test_memory_limit_is_an_address_space_limit_in_the_worker(tmp_path, models):
    out = tmp_path / "z"
    limits = tmp_path / "limits.txt"
    done = subprocess.run(_zoo_cmd(models, "LIMITS", out, "--max-memory", "2", "--threads", "1"), env=_env(ZOO_LIMITS=str(limits)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results" / "limits.json").read_text())["status"] == "ok"
    cap, size = map(int, limits.read_text().split())
    assert size < cap <= size + 2 * 2**30 + 128 * 2**20  # 128 MiB for its one thread

