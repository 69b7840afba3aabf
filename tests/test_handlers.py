"""One equivalence test per handler kind: slim output == masked original (rel. tol 1e-5, fp32),
output shapes kept, MACs and params fell."""
from __future__ import annotations

import pytest
import torch

from .conftest import prune_and_check
from .handler_models import HANDLER_MODELS


@pytest.mark.parametrize("name", sorted(HANDLER_MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_handler_equivalence(name, seed):
    build, shape = HANDLER_MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.randn(shape)
    analysis, slim = prune_and_check(model, x, seed=seed)
    assert analysis.channels.prunable_groups
    assert analysis.boundaries == [], [b.reason for b in analysis.boundaries]


def test_repeat_interleave_of_the_channel_dim_is_a_boundary():
    import fxprune

    class Along(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            y = y.repeat_interleave(2, dim=self.dim) if self.dim is not None else \
                y.repeat_interleave(2).view(1, 8, 4, 4)
            return self.b(y)

    for dim in (1, None):
        analysis = fxprune.analyze(Along(dim), torch.randn(1, 3, 4, 4))
        assert not any(m.target == "a.weight" for g in analysis.channels.prunable_groups for m in g.members)
