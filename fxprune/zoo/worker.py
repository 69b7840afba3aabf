"""Convert one zoo model in its own process: ``python -m fxprune.zoo.worker JOB.json``.

The job file names the model (a `ZooEntry`), the compression options and the output directory.
The worker writes its current stage to ``work/NAME.stage`` (the parent's progress bar reads it),
the artifact to ``artifacts/NAME/`` and, last, its result to ``results/NAME.json`` — all
atomically, so a killed worker leaves no result and the model is simply redone on resume.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from ..api import compress
from ..artifacts import atomic_write, save
from ..export import check_exports
from ..inputs import ExampleInputs
from ..latency import median_latency_ms
from ..models import build_model
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


def convert(job: dict) -> dict:
    entry, opts, out = job["entry"], job["options"], Path(job["out"])
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
                        min_channels=opts.get("min_channels", 1), min_ratio=opts.get("min_ratio", 0.0))
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


def main(argv=None) -> int:
    job_file = Path((argv or sys.argv[1:])[0])
    job = json.loads(job_file.read_text())
    result = convert(job)
    out = Path(job["out"])
    atomic_write(out / "results" / f"{job['entry']['name']}.json", json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
