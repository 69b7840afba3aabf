"""Where the realized CPU speedup of a slim resnet50 goes: the numbers behind the hand-written part of
docs/benchmarks.md ("How the goals were worked on").

Run from the repository root: ``python -m benches.experiments.speedup_breakdown`` (about 4 minutes
on the 2-core CPU; Torch-Pruning parts are skipped when it is not installed). Prints Markdown:

1. per-layer convolution time and throughput of the original and the l1 slim model at half the
   FLOPs (batch 32, steady heap), grouped by kernel size and resolution;
2. time per op kind (torch.profiler);
3. speedup per MACs reduction of l1 and uniform, with and without round_to=8;
4. fxprune's vs Torch-Pruning's slim model with round_to=8, pair by pair, and where their widths differ;
5. the allocator effect: the original timed on the default heap before and after Torch-Pruning's
   search runs in the same process, and on a steady heap;
6. the module form: the original eager, traced by plain `torch.fx.symbolic_trace` (which records
   `out += identity` out of place) and by fxprune's tracer.
"""
from __future__ import annotations

import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fxprune
from benches.harness.peer import prune_to_macs, torch_pruning_status
from fxprune.passes.inputs import ExampleInputs
from fxprune.latency import interleaved_latency_ms, paired_latency_ratio, steady_heap
from fxprune.models import build_model, example_input

BATCH, FLOPS = 32, 0.5
OP_KIND = {"aten::mkldnn_convolution": "conv", "aten::native_batch_norm": "batch norm",
           "aten::max_pool2d_with_indices": "max-pool", "aten::add_": "add", "aten::clamp_min_": "ReLU"}


def conv_times(model, x, repeats=4) -> dict:
    """{conv name: (median seconds, MACs, kernel, output resolution)} from forward hooks."""
    times, info, hooks = collections.defaultdict(list), {}, []

    def pre(mod, inp):
        mod._t0 = time.perf_counter()

    def post(mod, inp, out):
        times[mod._bench_name].append(time.perf_counter() - mod._t0)
        k = mod.kernel_size[0] * mod.kernel_size[1]
        info[mod._bench_name] = (out.numel() * mod.in_channels // mod.groups * k, mod.kernel_size, out.shape[-1])

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod._bench_name = name
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    with torch.inference_mode():
        for _ in range(repeats + 1):
            model(x)
    for h in hooks:
        h.remove()
    return {n: (statistics.median(t[1:]), *info[n]) for n, t in times.items()}


def per_layer_table(original, slim, x) -> str:
    with steady_heap():
        a, b = conv_times(original, x), conv_times(slim, x)
    rows = collections.defaultdict(lambda: [0.0, 0.0, 0, 0])
    for name, (t, macs, kernel, res) in a.items():
        r = rows[f"{kernel[0]}x{kernel[1]} convs at {res}x{res}"]
        r[0] += t
        r[1] += b[name][0]
        r[2] += macs
        r[3] += b[name][1]
    total = [sum(v[i] for v in rows.values()) for i in range(4)]
    lines = ["| layers | original ms | slim ms | time ratio | MACs ratio | GMAC/s original | GMAC/s slim |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, (ta, tb, ma, mb) in [*sorted(rows.items()), ("all convolutions", total)]:
        lines.append(f"| {key} | {1e3 * ta:.0f} | {1e3 * tb:.0f} | {ta / tb:.2f} | {ma / mb:.2f} | "
                     f"{ma / ta / 1e9:.0f} | {mb / tb / 1e9:.0f} |")
    return "\n".join(lines)


def op_kinds_table(models: dict, x) -> str:
    kinds = {}
    with steady_heap(), torch.inference_mode():
        for name, model in models.items():
            model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(x)
            c = collections.Counter()
            for e in prof.key_averages():
                if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                    c[OP_KIND.get(e.key, "other")] += e.self_cpu_time_total / 1e3
            kinds[name] = c
    names = list(models)
    lines = ["| op kind | " + " | ".join(f"{n} ms" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for kind in ["conv", "batch norm", "ReLU", "add", "max-pool", "other"]:
        lines.append(f"| {kind} | " + " | ".join(f"{kinds[n][kind]:.0f}" for n in names) + " |")
    return "\n".join(lines)


def efficiency_table(original, x1, x) -> str:
    models = {"original": original}
    for method in ("l1", "uniform"):
        for round_to in (None, 8):
            models[f"{method}" + (f" round_to={round_to}" if round_to else "")] = fxprune.compress(
                original, method, x1, FLOPS, round_to=round_to)
    with steady_heap():
        ms = interleaved_latency_ms(models, ExampleInputs.normalize(x), repeats=4, warmup=1)
    base = ms["original"]["median_ms"]
    lines = ["| model | ms | MACs kept | speedup | speedup ÷ MACs reduction |", "|---|---:|---:|---:|---:|"]
    for name, model in models.items():
        kept = 1.0 if name == "original" else model.fxprune_report.macs_ratio
        speedup = base / ms[name]["median_ms"]
        lines.append(f"| {name} | {ms[name]['median_ms']:.0f} | {kept:.3f} | {speedup:.2f} | {speedup * kept:.2f} |")
    return "\n".join(lines)


def round_to_head_to_head(original, x1, x) -> str:
    fx = fxprune.compress(original, "l1", x1, FLOPS, round_to=8)
    tp = prune_to_macs(original, x1, FLOPS, 8)
    if not tp.ok:
        return f"Torch-Pruning: {tp.error}"
    widths = lambda m: [(n, c.out_channels) for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d)]
    differ = [f"{n} {a} vs {b}" for (n, a), (_, b) in zip(widths(fx), widths(tp.model)) if a != b]
    with steady_heap():
        r = paired_latency_ratio(fx, tp.model, ExampleInputs.normalize(x), pairs=7)
    return (f"MACs kept: fxprune {fx.fxprune_report.macs_ratio:.4f}, Torch-Pruning {tp.macs_fraction:.4f}; "
            f"time fxprune ÷ Torch-Pruning per pair {r['ratio_median']:.3f} (quartiles {r['ratio_q1']:.3f}-"
            f"{r['ratio_q3']:.3f}, 7 pairs). Widths that differ (fxprune vs Torch-Pruning): "
            + "; ".join(differ[:12]) + (f"; ... ({len(differ)} in all)" if len(differ) > 12 else ""))


def allocator_effect(original, x1, x) -> str:
    xs = ExampleInputs.normalize(x)

    def original_ms(steady: bool) -> float:
        with steady_heap() if steady else torch.inference_mode():
            return interleaved_latency_ms({"o": original}, xs, repeats=3, warmup=1)["o"]["median_ms"]

    before = original_ms(False)
    prune_to_macs(original, x1, FLOPS)  # Torch-Pruning's ratio search: many deep copies made and freed
    after = original_ms(False)
    return (f"original resnet50 at batch {BATCH}, default heap: {before:.0f} ms; after Torch-Pruning's search "
            f"in the same process: {after:.0f} ms; on a steady heap: {original_ms(True):.0f} ms")


def form_table(original, x) -> str:
    forms = {"eager": original, "torch.fx.symbolic_trace": torch.fx.symbolic_trace(original),
             "fxprune.trace": fxprune.trace(original).graph_module}
    with steady_heap():
        ms = interleaved_latency_ms(forms, ExampleInputs.normalize(x), repeats=4, warmup=1)
    return "; ".join(f"{name} {v['median_ms']:.0f} ms" for name, v in ms.items())


def main() -> None:
    torch.set_num_threads(2)
    original = build_model("torchvision:resnet50").eval()
    x1, x = example_input((1, 3, 224, 224)), example_input((BATCH, 3, 224, 224))
    slim = fxprune.compress(original, "l1", x1, FLOPS)
    has_tp = torch_pruning_status()[0] is not None
    if has_tp:  # first, while the process has not yet run Torch-Pruning
        print("## Allocator effect\n\n" + allocator_effect(original, x1, x) + "\n")
    print(f"## Per-layer convolutions, l1 at {FLOPS} of the FLOPs, batch {BATCH}\n\n" + per_layer_table(original, slim, x))
    print("\n## Time per op kind\n\n" + op_kinds_table({"original": original, "l1 slim": slim}, x))
    print("\n## Speedup per MACs reduction\n\n" + efficiency_table(original, x1, x))
    print("\n## Module form (original resnet50)\n\n" + form_table(original, x))
    if has_tp:
        print("\n## round_to=8: fxprune vs Torch-Pruning\n\n" + round_to_head_to_head(original, x1, x))


if __name__ == "__main__":
    main()
