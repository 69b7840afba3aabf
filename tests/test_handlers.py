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
