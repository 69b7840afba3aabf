"""FISTA: a proximal-gradient step with Nesterov momentum that drives soft masks to exact zeros.

Per mask tensor p with gradient g (GAL's authors, `fista.py`):

    first step:  alpha = 1, p_prev = p, y = p
    later:       alpha' = (1 + sqrt(1 + 4 alpha^2)) / 2
                 y = p + ((alpha - 1) / alpha') (p - p_prev);  p_prev = p;  alpha = alpha'
    z = y - lr * g                       # the gradient is the one taken at p, not at y
    p = sign(z) * max(|z| - lr * lam, 0)  # soft threshold: exact zeros
    p = max(p, 0)                        # masks stay non-negative (option `nonnegative`)

Momentum: the authors' restart flag can never fire (it tests an iteration count that is never a
multiple of the step interval), so alpha grows forever and the momentum coefficient tends to 1.
That is the default here; `restart()` resets alpha (GAL calls it at every LR decay when
``GALOptions.fista_restart`` is set).

Example::

    >>> opt = FISTA(masks, lr=0.01, lam=0.6)
    >>> loss.backward(); opt.step()
"""
from __future__ import annotations

import math

import torch


def soft_threshold(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of threshold * ||.||_1: sign(z) * max(|z| - threshold, 0)."""
    return torch.sign(z) * torch.clamp(z.abs() - threshold, min=0)


class FISTA(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.01, lam: float = 0.6, nonnegative: bool = True, weights=None):
        """`weights`: optional per-entry L1 weights, one tensor per parameter (threshold lr*lam*w)."""
        if lr <= 0 or lam < 0:
            raise ValueError(f"FISTA needs lr > 0 and lam >= 0 (got lr={lr}, lam={lam})")
        params = list(params)
        if weights is not None:
            weights = list(weights)
            if len(weights) != len(params):
                raise ValueError("FISTA weights: one tensor per parameter")
            for p, w in zip(params, weights):
                if w.shape != p.shape:
                    raise ValueError(f"FISTA weight of shape {tuple(w.shape)} for a parameter of {tuple(p.shape)}")
        super().__init__(params, {"lr": lr, "lam": lam, "nonnegative": nonnegative, "weights": weights})

    def restart(self) -> None:
        for state in self.state.values():
            state.pop("alpha", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, lam, weights = group["lr"], group["lam"], group["weights"]
            for k, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "alpha" not in state:
                    state["alpha"] = 1.0
                    state["prev"] = p.detach().clone()
                    y = p.detach().clone()
                else:
                    alpha = state["alpha"]
                    alpha_new = (1 + math.sqrt(1 + 4 * alpha * alpha)) / 2
                    y = p + ((alpha - 1) / alpha_new) * (p - state["prev"])
                    state["prev"] = p.detach().clone()
                    state["alpha"] = alpha_new
                z = y - lr * p.grad
                new = soft_threshold(z, lr * lam * (weights[k] if weights is not None else 1.0))
                if group["nonnegative"]:
                    new.clamp_(min=0)
                p.copy_(new)
        return loss
