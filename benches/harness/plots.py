"""PNG plots of a run (needs matplotlib: ``pip install 'fxprune[plots]'``).

* ``latency_vs_macs_<device>_<dtype>_b<batch>.png``: per model, latency against MACs for the
  original and the slim models (one colour per model; circles fxprune, crosses Torch-Pruning,
  squares the original), log-log; unstable latencies are left out;
* ``fxprune_vs_torch_pruning_b<batch>.png``: per model, measured speedup of fxprune and
  Torch-Pruning at each FLOPs target, next to the MACs reduction (no bar for an unstable one).

Example::

    >>> from benches.harness.plots import write_plots
    >>> paths, message = write_plots({"models": {}}, "/tmp/no-plots")
    >>> paths
    []
"""
from __future__ import annotations

from pathlib import Path


def matplotlib_status():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"Plots skipped: matplotlib is not installed ({exc}); pip install 'fxprune[plots]'."
    return plt, f"matplotlib {matplotlib.__version__}"


def _settings(results: dict) -> list[tuple]:
    seen = []
    for e in results.get("models", {}).values():
        for lat in e.get("latency", []):
            k = (lat["device"], lat["dtype"], lat["torch_compile"], lat["batch"])
            if "error" not in lat and k not in seen:
                seen.append(k)
    return seen


def _latency_vs_macs(plt, results: dict, setting: tuple, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    cmap = plt.get_cmap("tab20")
    for i, (name, e) in enumerate(results["models"].items()):
        lat = next((x for x in e.get("latency", []) if (x["device"], x["dtype"], x["torch_compile"], x["batch"])
                    == setting and "error" not in x), None)
        if lat is None:
            continue
        if not (lat.get("original") or {}).get("stable", True):
            continue  # an unstable latency is no result: not plotted
        color = cmap(i % 20)
        ax.scatter([e["macs"] / 1e9], [lat["original_ms"]], marker="s", color=color, label=name)
        variants = {v["key"]: v for v in e["variants"]}
        for key, s in lat["slim"].items():
            if not s.get("stable", True):
                continue
            v = variants[key]
            ax.scatter([v["macs"] / 1e9], [s["ms"]], marker="o" if v["tool"] == "fxprune" else "x", color=color)
            ax.plot([e["macs"] / 1e9, v["macs"] / 1e9], [lat["original_ms"], s["ms"]], color=color, alpha=0.2, lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    device, dtype, compiled, batch = setting
    ax.set_xlabel("GMACs per image (batch-1 count)")
    ax.set_ylabel(f"latency ms (batch {batch})")
    ax.set_title(f"Latency vs MACs: {device} {dtype}, torch.compile {'on' if compiled else 'off'}, batch {batch}\n"
                 "square = original, circle = fxprune, cross = Torch-Pruning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedup(s: dict | None) -> float:
    """0 where the model did not convert, NaN (no bar) where its speedup is unstable."""
    if not s:
        return 0.0
    return float("nan") if s.get("speedup") is None or not s.get("stable", True) else s["speedup"]


def _versus(plt, results: dict, setting: tuple, path: Path) -> bool:
    labels, fx, tp, red = [], [], [], []
    for name, e in results["models"].items():
        lat = next((x for x in e.get("latency", []) if (x["device"], x["dtype"], x["torch_compile"], x["batch"])
                    == setting and "error" not in x), None)
        for v in e.get("variants", []):
            if v["tool"] != "fxprune" or v["round_to"] is not None:
                continue
            peer_key = v["key"].replace("fxprune", "torch_pruning", 1)
            slim = (lat or {}).get("slim", {})
            labels.append(f"{name} {v['flops']:g}")
            fx.append(_speedup(slim.get(v["key"])))
            tp.append(_speedup(slim.get(peer_key)))
            red.append(slim.get(v["key"], {}).get("macs_reduction", 0.0))
    if not any(t == t and t for t in tp):  # NaN != NaN: an unstable speedup counts as none
        return False
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels)), 5))
    xs = range(len(labels))
    w = 0.28
    ax.bar([x - w for x in xs], red, w, label="MACs reduction (fxprune)", color="#bbbbbb")
    ax.bar(list(xs), fx, w, label="fxprune speedup", color="#1f77b4")
    ax.bar([x + w for x in xs], tp, w, label="Torch-Pruning speedup (0 = did not convert)", color="#ff7f0e")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    device, dtype, compiled, batch = setting
    ax.set_ylabel("x faster than the original")
    ax.set_title(f"fxprune vs Torch-Pruning per model and FLOPs target: {device} {dtype}, batch {batch}")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results: dict, out_dir) -> tuple[list[Path], str]:
    """Write the PNGs into `out_dir`; (paths written, a message saying what happened)."""
    settings = _settings(results)
    if not settings:
        return [], "Plots skipped: no latency was measured."
    plt, message = matplotlib_status()
    if plt is None:
        return [], message
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for setting in settings:
        device, dtype, compiled, batch = setting
        tag = f"{device}_{dtype}{'_compiled' if compiled else ''}_b{batch}"
        p = out / f"latency_vs_macs_{tag}.png"
        _latency_vs_macs(plt, results, setting, p)
        paths.append(p)
        p = out / f"fxprune_vs_torch_pruning_{tag}.png"
        if _versus(plt, results, setting, p):
            paths.append(p)
    return paths, f"{len(paths)} plots written with {message}"
