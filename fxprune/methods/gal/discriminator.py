"""GAL's discriminators: tell the baseline's outputs from the masked generator's.

* ``mlp`` (default): Linear(d, 128) - ReLU - Linear(128, 256) - ReLU - Linear(256, 128) - ReLU -
  Linear(128, 1), returning a *logit* for ``BCEWithLogitsLoss``. A real classifier of output
  distributions.
* ``authors``: the same widths with no nonlinearity between the layers (so one affine map),
  followed by a sigmoid whose output is then fed to ``BCEWithLogitsLoss`` — a sigmoid applied
  twice, as in the authors' `model/discriminator.py`. Its probabilities live in (0.5, 0.73), so
  its loss can barely move; kept selectable to reproduce the paper's code.

The authors' variant is initialised N(0, 0.01) with zero biases, as in their code; the MLP keeps
PyTorch's default (Kaiming-uniform) initialisation: at N(0, 0.01) four ReLU layers start with an
output ~1e-8 and gradients too small to learn from in a short run.

`output_features(out)` turns a model output (a tensor, or a tuple/list/dict of tensors) into one
[batch, features] matrix: spatial dims are averaged, the rest flattened and concatenated.
"""
from __future__ import annotations

import torch
from torch import nn

DISCRIMINATORS = ("mlp", "authors")


def output_features(out) -> torch.Tensor:
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    if isinstance(out, (tuple, list)):
        return torch.cat([output_features(o) for o in out if isinstance(o, torch.Tensor) or
                          isinstance(o, (tuple, list, dict))], dim=1)
    if out.ndim > 2:
        out = out.flatten(2).mean(2)
    return out.reshape(out.shape[0], -1)


class _Sigmoid(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)


def make_discriminator(kind: str, features: int, dtype=torch.float32, device=None) -> nn.Module:
    widths = (features, 128, 256, 128, 1)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if kind == "mlp" and i < len(widths) - 2:
            layers.append(nn.ReLU())
    if kind == "authors":
        layers.append(_Sigmoid())
    net = nn.Sequential(*layers)
    for m in net if kind == "authors" else ():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return net.to(dtype=dtype, device=device)
