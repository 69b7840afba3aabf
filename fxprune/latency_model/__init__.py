"""Latency of a model on the device it will run on, as a function of the kept units per group.

fxprune counts MACs; a device runs time. A GPU conv runs in tiles, so its time is a staircase in
its channel counts; norms, activations, adds and pooling are memory-bound (time follows channels,
not MACs); small batches are launch-bound; oneDNN on the CPU has sweet spots. `profile_latency`
measures that, layer by layer, on the device (`profile.py` says what is measured and how), and
returns a `LatencyModel`:

    predicted(kept) = offset + scale x sum over profiled layers of t_layer(in channels, out channels)

with each layer's channel counts read from the kept units of the groups its input and output
carry (`layers.py`), `offset` / `scale` fitted to end-to-end measurements of uniformly slimmed
networks, and `original_s` the full model measured end to end. `group_steps(g)` lists the kept
counts of group g at the lower edges of its layers' steps (`detect_steps`), where a selection
should land: keeping fewer units inside a step saves nothing.

Separable tables. A layer with two varying axes (a conv between two prunable groups) is measured
along each axis with the other full, t(i, O) and t(I, o), plus up to three corners t(i, o) off the
axes, and read as

    t(i, o) = alpha + (T - alpha) x (t(i, O) - alpha) / (T - alpha) x (t(I, o) - alpha) / (T - alpha)

(T = t(I, O)). With alpha = 0 this is the plain separable approximation t(i, O) t(I, o) / T, exact
when the time is a product f(i) g(o); the constant alpha (solved from the corners,
`steps.estimate_alpha`) makes it exact as well for a per-call overhead plus a product, e.g.
a i o + b o + c (the MACs, the output writes, the launch). On the axes it is the measurement;
between grid points it interpolates each axis (linearly on the CPU's coarse grid, by the next
tile on the GPU's 8-channel grid). A 1-D layer is its one curve. Curves are read on their
monotone envelopes, so predictions never fall when a group keeps more.

Example::

    >>> analysis = fxprune.analyze(model, torch.randn(1, 3, 224, 224))
    >>> lat = profile_latency(analysis, batch=32, threads=2)          # measured, or from the cache
    >>> lat.predict({g.index: g.n_units // 2 for g in analysis.channels.prunable_groups})
    >>> lat.group_steps(3)                                            # array([ 8, 16, ..., 64])
"""
from __future__ import annotations

from .layers import Axis, LayerSpec
from .model import LatencyModel
from .profile import TimedCall, cache_path, measure_model, measure_models, profile_latency
from .steps import detect_steps, monotone_envelope

__all__ = ["Axis", "LatencyModel", "LayerSpec", "TimedCall", "cache_path", "detect_steps", "measure_model", "measure_models",
           "monotone_envelope", "profile_latency"]
