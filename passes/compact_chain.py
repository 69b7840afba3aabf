"""The runtime of a *compact chain*: two convs whose channels between them are masked, computed
over the live channels only, with the tensor between them kept compact.

Why: the masked convolution op (`fxprune.kernels`) skips a dead channel's arithmetic but still
writes a dense output (dead channels as zeros), and the BatchNorm, mask multiplication and
activation after it, and the next conv's gather, all run over every channel. Between two convs
of a pruned network that is most of a training step's time on small layers. When the channels
between ``conv1 -> [BatchNorm2d] -> * scale -> activations -> conv2`` are masked by a constant
factor of ``scale`` (a buffer: Gate Decorator's mask, GAL's frozen masks), none of these needs
the dead channels: `compact_conv` computes conv1's live filters, the BatchNorm over the live
channels and the scale, the activations run unchanged on the [N, live, H, W] tensor (they are
per channel), and conv2 (`compact_conv` again) convolves it with its live input columns.

Exact, like the fused op's patterns (`passes.fuse_masked_conv`, pattern "compact"): a dead channel
is multiplied by zero in the original, then by an activation with f(0) = 0, so conv2 reads zeros
there; no gradient reaches conv1's dead filters, the BatchNorm's dead affine entries, the dead
entries of the scale's factors (the constant factor is zero there) or conv2's dead input columns.
What differs: the BatchNorm running statistics of dead channels are not updated (those channels
are pruned), and forward hooks of the three modules do not run while training through the chain.

A conv that both reads and writes masked channels (the middle of ``conv -> BN -> * s -> relu ->
conv -> BN -> * s -> relu -> conv``, as in VGG) reads a compact tensor and writes one: the chain
runs compact from its first conv to its last (`compact_conv`).

*Regions* generalise chains to residual streams. A region is every tensor reachable from masked
producers (``conv -> [BN] -> * s``) through per-channel steps and adds whose operands are all in
the region (ResNet's ``relu(bn2(conv2(h)) * s + x)``, where ``x`` is the stream). Its live
channels are those some producer keeps (a channel every producer's constant factor zeroes is exact
zero in every region tensor: adds of zeros, f(0) = 0); each producer computes them with its own
scale (zero where only another producer keeps the channel, as the plain graph does); every conv
that reads a region tensor reads its live columns; any other reader (a flatten, a concatenation,
a grouped conv, the graph's output) gets the dense tensor back from `expand_channels`.

`live_channels(keep)` is evaluated on every call, so in-place mask updates (Gate Decorator's
Ticks) are seen. With every channel live, or none, a conv computes as the plain graph does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def live_channels(keep: Tensor) -> Tensor:
    """Sorted indices of the non-zero entries of the [C] vector `keep`."""
    return (keep != 0).nonzero().reshape(-1)


class LiveChannels(nn.Module):
    """`live_channels(keep)`, remembered while the tensors `keep` is computed from (`sources`: the
    region's mask buffers and frozen parameters) keep their identity and version counter.

    Why: ``nonzero`` makes the host wait for the device on every call, once per region and step;
    the masks change only at Gate Decorator's Ticks and GAL's fills. In-place writes (``copy_``,
    ``fill_``, indexed assignment, also under ``torch.no_grad()``) bump a tensor's version, and
    moving the module (``.to``) replaces the tensors, so both are seen. A write through ``.data``
    bumps nothing: a graph built with ``cache_live=True`` must not have its masks written that way
    (fxprune's methods never do). Moving a module keeps its parameters' identity (``.to`` sets their
    ``.data``), so the remembered indices are also recomputed when `keep` is on another device.
    With no `sources` (a constant all-ones vector) they are computed once."""

    def __init__(self):
        super().__init__()
        self._seen: tuple = ()  # (tensor, version) of each source at the last computation
        self._live: Tensor | None = None

    def forward(self, keep: Tensor, *sources: Tensor) -> Tensor:
        seen = self._seen
        if (self._live is None or len(seen) != len(sources) or self._live.device != keep.device
                or any(t is not s or t._version != v for (t, v), s in zip(seen, sources))):
            self._live = live_channels(keep)
            self._seen = tuple((s, s._version) for s in sources)
        return self._live


def _batch_norm(y: Tensor, live: Tensor | None, norm: nn.BatchNorm2d) -> Tensor:
    """`nn.BatchNorm2d.forward` of `norm` (its state as it is now: train/eval, momentum...) on the
    channels `live`. Running statistics are read and updated on the live channels only."""
    weight, bias, running_mean, running_var = norm.weight, norm.bias, norm.running_mean, norm.running_var
    num_batches_tracked, training, momentum, track = (norm.num_batches_tracked, norm.training, norm.momentum,
                                                      norm.track_running_stats)
    eps = norm.eps
    factor = 0.0 if momentum is None else momentum
    if training and track and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    use_batch = training or (running_mean is None and running_var is None)

    def part(t):
        return t if t is None or live is None else t.index_select(0, live)

    pass_stats = not training or track
    rm = part(running_mean) if pass_stats else None
    rv = part(running_var) if pass_stats else None
    out = F.batch_norm(y, rm, rv, part(weight), part(bias), use_batch, factor, eps)
    if live is not None and use_batch and rm is not None:  # the gathered statistics were updated
        with torch.no_grad():
            running_mean.index_copy_(0, live, rm)
            running_var.index_copy_(0, live, rv)
    return out


def compact_conv(x: Tensor, live_in: Tensor | None, live_out: Tensor | None, weight: Tensor, bias: Tensor | None,
                 stride, padding, dilation, scale: Tensor | None = None, norm: nn.BatchNorm2d | None = None,
                 groups: int = 1) -> Tensor:
    """One conv of a compact chain.

    `live_in`: the input is compact (its channels are the conv's input channels `live_in`), else
    dense. `live_out`: the output is compact: the conv's output channels `live_out`, then `norm`
    (its BatchNorm) and the [C] `scale` on them, as the original computed them on every channel;
    else the conv's dense output (the chain's last conv: no norm, no scale). With every channel
    live this is exactly the original computation.

    `groups` > 1: a depthwise conv (one input channel per output channel) inside one region: its
    input and output are compact over the same live channels (`live_in` is `live_out`), so it
    convolves the live channels' filters as a depthwise conv of that many channels."""
    cout, cin = weight.shape[0], weight.shape[1]
    w, b = weight, bias
    if groups == 1 and live_in is not None and 0 < live_in.numel() < cin:  # (none live: dense zeros come in)
        w = w.index_select(1, live_in)
    if live_out is None:
        return F.conv2d(x, w, b, stride, padding, dilation)
    # nothing live goes out: the dense computation, whose output the zero mask makes all zeros (every
    # parameter still takes part, with the zero gradients the plain graph gives it)
    gather = 0 < live_out.numel() < cout
    if gather:
        w = w.index_select(0, live_out)
        b = None if b is None else b.index_select(0, live_out)
    if groups > 1:
        groups = w.shape[0]  # depthwise over the channels computed
    s = scale.index_select(0, live_out) if gather else scale
    if norm is None:  # nothing between the conv and the scale: fold it into the filters (no pass over the output)
        return F.conv2d(x, w * s.reshape(-1, 1, 1, 1), None if b is None else b * s, stride, padding, dilation, groups)
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if y.shape[1]:
        y = _batch_norm(y, live_out if gather else None, norm)
    return y * s.reshape(1, -1, 1, 1)


def expand_channels(x: Tensor, live: Tensor, channels: int) -> Tensor:
    """The dense [N, `channels`, ...] tensor of the compact `x` (its channels `live`; zeros
    elsewhere), for a reader of a compact region that needs every channel. With every channel live,
    or none, `x` is already dense (see `compact_conv`) and is returned as it is."""
    if not 0 < live.numel() < channels:
        return x
    return x.new_zeros((x.shape[0], channels) + tuple(x.shape[2:])).index_copy(1, live, x)


__all__ = ["LiveChannels", "compact_conv", "expand_channels", "live_channels"]
