"""What `fxprune profile` prints and draws: a model's latency model on a device, layer by layer.

The table lists each profiled layer (node, op, the groups it depends on, time at full width, and the
step edges found on each axis); the summary the measured and predicted full model, the end-to-end
fit and what the profile cost. `plot_staircases` draws each layer's measured time against its kept
channels (PNG; needs the `plots` extra, matplotlib).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from tabulate import tabulate

from .errors import ConfigError
from .latency_model import LatencyModel, detect_steps


def _edges(axis: dict | None) -> str:
    if not axis or len(axis.get("x", [])) < 2:
        return ""
    edges = detect_steps(np.asarray(axis["x"], dtype=float), np.asarray(axis["t"], dtype=float))
    return ",".join(str(int(e)) for e in edges)


def layer_rows(model: LatencyModel, limit: int | None = None) -> list[list]:
    rows = []
    for layer in model.layers():
        axes = [a for a in (layer.get("in"), layer.get("out")) if a]
        full = max((a["t"][-1] for a in axes if a.get("t")), default=float("nan"))
        rows.append([layer["node"], layer["op"], ",".join(str(g) for g in layer["groups"]), f"{full * 1e3:.3f}",
                     _edges(layer.get("in")), _edges(layer.get("out"))])
    rows.sort(key=lambda r: -float(r[3]) if not math.isnan(float(r[3])) else 0.0)
    return rows[:limit] if limit else rows


def render(model: LatencyModel, limit: int | None = None) -> str:
    head = tabulate(layer_rows(model, limit), tablefmt="github",
                    headers=["node", "op", "groups", "full (ms)", "in: step edges (channels)",
                             "out: step edges (channels)"])
    key, prof = model.key, model.profile if isinstance(model.profile, dict) else {}
    where = ", ".join(f"{k} {key[k]}" for k in ("device", "device_name", "dtype", "batch", "channels_last", "compile",
                                                 "threads") if k in key)
    cost = (f"measured {prof.get('calls', '?')} timed points in {prof.get('seconds', 0):.1f} s"
            if model.source == "measured" else "loaded from the cache")
    summary = (f"original measured {model.original_s * 1e3:.3f} ms, predicted {model.predict({}) * 1e3:.3f} ms "
               f"(fit: offset {model.offset * 1e3:.3f} ms, scale {model.scale:.3f}); "
               f"{len(model.layers())} layers; {cost}")
    return "\n\n".join([head, where + "\n" + summary])


def write_json(model: LatencyModel, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(model.to_json(), indent=1))
    return path


def plot_staircases(model: LatencyModel, path, limit: int = 24) -> Path:
    """One panel per layer (the `limit` slowest): time vs kept channels on each axis, edges marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install -e '.[plots]'") from exc
    layers = sorted(model.layers(), key=lambda L: -max((a["t"][-1] for a in (L.get("in"), L.get("out"))
                                                         if a and a.get("t")), default=0.0))[:limit]
    cols = 4
    rows = max(1, math.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for name, style in (("in", "o-"), ("out", "s-")):
            axis = layer.get(name)
            if not axis or not axis.get("x"):
                continue
            x, t = np.asarray(axis["x"], dtype=float), np.asarray(axis["t"], dtype=float) * 1e3
            ax.plot(x, t, style, ms=3, label=f"{name} channels")
            for edge in detect_steps(x, t / 1e3):
                ax.axvline(edge, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{layer['node']} ({layer['op']})", fontsize=8)
        ax.set_xlabel("kept channels", fontsize=7)
        ax.set_ylabel("ms", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
