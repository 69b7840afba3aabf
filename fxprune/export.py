"""Does a slim model deploy? `torch.export`, `torch.compile` and ONNX, each checked on its own.

Each check returns "ok", "skipped: <why>" or "failed: <first line of the error>"; export and
compile also compare their outputs with the eager model's (relative tolerance 1e-3).
ONNX needs the optional extra: `pip install 'fxprune[onnx]'`.
"""
from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from .passes.inputs import ExampleInputs, output_leaves
from .verify import eval_mode

CHECKS = ("export", "compile", "onnx")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def _agree(reference, candidate) -> bool:
    ref, got = output_leaves(reference), output_leaves(candidate)
    if [p for p, _ in ref] != [p for p, _ in got]:
        return False
    for (_, a), (_, b) in zip(ref, got):
        if a.shape != b.shape:
            return False
        if a.is_floating_point():
            scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-30)
            if float((a - b).abs().max()) / scale > 1e-3:
                return False
    return True


def _export(model, inputs):
    program = torch.export.export(model, inputs.args, inputs.kwargs)
    return program.module()(*inputs.args, **inputs.kwargs)


def _compile(model, inputs):
    return torch.compile(model)(*inputs.args, **inputs.kwargs)


def _onnx(model, inputs):
    import onnx

    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True)
    onnx.checker.check_model(program.model_proto)
    return None


def check_exports(model: nn.Module, inputs: ExampleInputs, checks=CHECKS) -> dict[str, str]:
    results = {}
    with torch.no_grad(), eval_mode(model):
        reference = inputs.call(model)
        for name in checks:
            if name == "onnx":
                try:
                    import onnx  # noqa: F401
                    import onnxscript  # noqa: F401
                except ImportError:
                    results[name] = "skipped: pip install 'fxprune[onnx]'"
                    continue
            run = {"export": _export, "compile": _compile, "onnx": _onnx}[name]
            try:
                out = run(model, inputs)
            except Exception as exc:  # noqa: BLE001 - reported, never raised: one check per column
                results[name] = f"failed: {_first_line(exc)}"
                continue
            results[name] = "ok" if out is None or _agree(reference, out) else "failed: outputs differ"
    return results
