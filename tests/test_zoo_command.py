"""`fxprune zoo`: isolation (crash, hang, memory), resume after a kill, artifacts, report numbers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.cli import main
from fxprune.export import check_exports
from fxprune.zoo import select
from fxprune.zoo.worker import convert

from .conftest import measured_macs

DATA = Path(__file__).parent / "data" / "zoo_models.py"
ROOT = Path(__file__).parent.parent


def _rows(out: Path) -> dict:
    return {r["model"]: r for r in json.loads((out / "report.json").read_text())}


def _ppid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_one_failing_model_does_not_stop_the_batch(tmp_path, capsys):
    out = tmp_path / "z"
    assert main(["zoo", "--models-from", f"{DATA}:BROKEN", "--out", str(out), "--timeout", "20",
                 "--max-memory", "1.5", "--jobs", "2", "--checks", "export", "--quiet"]) == 0
    rows = _rows(out)
    assert set(rows) == {"small", "crash", "hang", "hog", "untraceable"}
    assert rows["small"]["status"] == "ok"
    assert rows["crash"]["status"] == "failed" and "exit code 3" in rows["crash"]["error"]
    assert rows["hang"]["status"] == "timeout" and "stage build" in rows["hang"]["error"]
    assert rows["hog"]["status"] == "memory"
    assert rows["untraceable"]["status"] == "failed" and rows["untraceable"]["error"].startswith("TraceError")
    printed = capsys.readouterr().out
    assert "| small" in printed and "1/5 converted" in printed
    md = (out / "report.md").read_text()
    assert "FLOPs (2×MACs)" in md and "TraceError" in md


def test_report_numbers_agree_with_an_independent_count(tmp_path):
    out = tmp_path / "z"
    assert main(["zoo", "--models-from", str(DATA), "--models", "small*", "--out", str(out),
                 "--checks", "export", "--quiet"]) == 0
    for name, row in _rows(out).items():
        assert row["status"] == "ok"
        r = row["report"]
        slim = fxprune.load(out / "artifacts" / name, trust_code=True)  # built from our own models file
        x = torch.randn(1, 3, 16, 16)
        assert measured_macs(slim, x) == r["macs_after"] <= 0.5 * r["macs_before"]
        assert r["flops_after"] == 2 * r["macs_after"]
        assert sum(p.numel() for p in slim.parameters()) == r["params_after"]
        assert row["exports"] == {"export": "ok"}
        assert len(row["latency_ms"]) == 2 and min(row["latency_ms"]) > 0


def test_resume_after_a_killed_run(tmp_path):
    out = tmp_path / "z"
    cmd = [sys.executable, "-m", "fxprune.cli", "zoo", "--models-from", str(DATA), "--out", str(out),
           "--checks", "", "--no-latency", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), FXPRUNE_TEST_SLOW_S="60")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and (len(list((out / "results").glob("*.json"))) < 2
                                      or not (out / "work" / "slow.stage").exists()):
        time.sleep(0.2)
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid]
    assert len(workers) == 1  # the worker busy with "slow"
    os.killpg(proc.pid, signal.SIGKILL)  # the parent only: the worker dies with it
    proc.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.05)
    assert not any(_running(pid) for pid in workers)
    done = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert set(done) == {"small.json", "small_wide.json"}
    assert set(_rows(out)) <= {"small", "small_wide"}  # the killed run's report is whole JSON
    env["FXPRUNE_TEST_SLOW_S"] = "0"
    subprocess.run(cmd, env=env, check=True, timeout=300)
    rows = json.loads((out / "report.json").read_text())
    assert [r["model"] for r in rows] == ["small", "small_wide", "slow"]  # no duplicate, none lost
    assert all(r["status"] == "ok" for r in rows)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json") if p.name in done} == done


def test_detector_backbone_is_pruned_and_the_artifact_rebuilds_the_detector(tmp_path):
    entry = select(["detection"], "fasterrcnn_mobilenet_v3_large_320_fpn")[0]
    result = convert({"entry": entry.to_json(), "out": str(tmp_path),
                      "options": {"method": "l1", "flops": 0.5, "checks": [], "latency": False}})
    assert result["status"] == "ok", result.get("error")
    assert result["report"]["macs_after"] <= 0.5 * result["report"]["macs_before"]
    detector = fxprune.load(tmp_path / "artifacts" / entry.name)
    assert type(detector).__name__ == "FasterRCNN"
    assert isinstance(detector.backbone, torch.fx.GraphModule)
    detector.eval()
    with torch.no_grad():
        detections = detector([torch.rand(3, 160, 160)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def test_model_selection():
    names = [e.name for e in select(["classification"], "resnet1*,mobilenet_v3*")]
    assert names == ["mobilenet_v3_large", "mobilenet_v3_small", "resnet101", "resnet152", "resnet18"]
    seg = select(["segmentation"])
    assert len(seg) == 6 and all(e.build_kwargs == {"weights_backbone": None} for e in seg)
    assert all(e.submodule == "backbone" for e in select(["detection"]))
    with pytest.raises(fxprune.ConfigError, match="unknown task"):
        select(["audio"])
    with pytest.raises(fxprune.ConfigError, match="no model matches"):
        select(["classification"], "nothing*")


def test_export_checks_report_each_target():
    from .handler_models import Residual

    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    slim = fxprune.compress(model, "l1", x, 0.5)
    results = check_exports(slim, fxprune.ExampleInputs.normalize(x), ("export", "onnx"))
    assert results["export"] == "ok"
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401

        assert results["onnx"] == "ok"
    except ImportError:
        assert results["onnx"].startswith("skipped: pip install")


@pytest.mark.slow
def test_torch_compile_check():
    from .handler_models import Residual

    slim = fxprune.compress(Residual().eval(), "l1", torch.randn(1, 3, 8, 8), 0.5)
    assert check_exports(slim, fxprune.ExampleInputs.normalize(torch.randn(1, 3, 8, 8)), ("compile",)) == {
        "compile": "ok"}


ATTENTION_MODELS_PY = '''
import torch
from torch import nn


class Tokens(nn.Module):
    """A conv stem's 4x4 patches as 16 tokens, pre-norm self-attention with a residual, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        h = self.norm(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return self.head(t.mean(1))


MODELS = {"tokens": (Tokens, (1, 3, 16, 16))}
'''


def test_zoo_heads_and_layernorm_reach_compress_and_a_rerun_with_others_is_refused(tmp_path, capsys):
    """--heads / --layernorm go to every worker's compress, are recorded in run.json and in the
    artifact's recipe, and (like --grouped) a rerun with other values is refused unless --force."""
    from fxprune.passes.ops.attention import PrunedMultiheadAttention

    models = tmp_path / "models.py"
    models.write_text(ATTENTION_MODELS_PY)
    out = tmp_path / "z"
    base = ["zoo", "--models-from", str(models), "--out", str(out), "--checks", "", "--no-latency", "--quiet"]
    assert main([*base, "--heads", "width", "--layernorm", "prune"]) == 0
    assert _rows(out)["tokens"]["status"] == "ok", _rows(out)["tokens"].get("error")
    options = json.loads((out / "run.json").read_text())["options"]
    assert (options["heads"], options["layernorm"]) == ("width", "prune")
    slim = fxprune.load(out / "artifacts" / "tokens", trust_code=True)  # built from our own models file
    assert (slim.fxprune_recipe["heads"], slim.fxprune_recipe["layernorm"]) == ("width", "prune")
    attn = slim.attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2  # width: every head stays
    assert attn.qk_dim < 8 or attn.v_dim < 8
    assert attn.in_proj_weight.shape[1] == slim.stem.out_channels < 16  # the stream went through the LayerNorm
    stamp = (out / "results" / "tokens.json").stat().st_mtime_ns
    capsys.readouterr()

    assert main([*base, "--heads", "whole"]) == 2
    err = capsys.readouterr().err
    assert "--heads width → whole" in err and "--layernorm prune → boundary" in err and "--force" in err
    assert (out / "results" / "tokens.json").stat().st_mtime_ns == stamp  # nothing was touched
    # (--force then redoes the model with the new options: test_zoo_trust.py, shared by every option)



def test_zoo_structure_options_are_checked_and_old_runs_resume(tmp_path):
    from fxprune.cli import build_parser
    from fxprune.zoo.runner import _differences, result_options

    args = build_parser().parse_args(["zoo", "--heads", "auto", "--layernorm", "prune"])
    assert (args.heads, args.layernorm, args.grouped) == ("auto", "prune", "whole")
    for flag, value in (("--heads", "both"), ("--layernorm", "maybe"), ("--grouped", "half")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["zoo", flag, value])
    new = {"options": result_options({"method": "l1", "flops": 0.5}), "models": {}}
    assert (new["options"]["heads"], new["options"]["layernorm"]) == ("whole", "boundary")
    old = {"options": {k: v for k, v in new["options"].items() if k not in ("heads", "layernorm")}, "models": {}}
    assert _differences(old, new, tmp_path) == []  # a run from before the options: their defaults
