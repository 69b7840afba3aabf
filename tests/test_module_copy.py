"""The rewrite's private copy: independent of the user's model except for the tensors it shares."""
from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from fxprune.passes.module_copy import copy_sharing


def _gm():
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(torchvision.models.resnet18().eval())


def test_copy_is_independent_and_equal():
    gm = _gm()
    twin = copy_sharing(gm, [])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(twin(x), gm(x), rtol=0, atol=0)
    for (name, a), (_, b) in zip(gm.named_modules(), twin.named_modules()):
        assert a is not b, name
        assert (type(a) is type(b) or name == "") and a.training == b.training, name  # root: own fx class
    for (name, a), (_, b) in zip(gm.state_dict(keep_vars=True).items(), twin.state_dict(keep_vars=True).items()):
        assert a is not b and a.data_ptr() != b.data_ptr() and torch.equal(a, b), name
        assert type(a) is type(b) and a.requires_grad == b.requires_grad, name
    # changing the copy leaves the original alone: settings, hook dicts, tensors, the graph
    twin.conv1.out_channels = 7
    twin.conv1.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        twin.conv1.weight.zero_()
    assert gm.conv1.out_channels == 64 and not gm.conv1._forward_hooks
    assert gm.conv1.weight.abs().sum() > 0


def test_shared_tensors_are_the_same_objects():
    gm = _gm()
    twin = copy_sharing(gm, ["conv1.weight", "layer1.0.bn1.running_mean", "no.such.tensor"])
    assert twin.conv1.weight is gm.conv1.weight
    bn, twin_bn = gm.get_submodule("layer1.0.bn1"), twin.get_submodule("layer1.0.bn1")
    assert twin_bn.running_mean is bn.running_mean
    assert twin_bn.running_var is not bn.running_var and torch.equal(twin_bn.running_var, bn.running_var)


def test_leaves_with_hooks_or_user_state_are_deep_copied():
    calls = []

    class Custom(nn.Module):  # not torch.nn's own: always the deepcopy path
        def __init__(self):
            super().__init__()
            self.table = [torch.ones(2)]

        def forward(self, x):
            return x * self.table[0].sum()

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Custom())
    model[0].register_forward_hook(lambda mod, inp, out: calls.append(1))
    twin = copy_sharing(model, [])
    twin(torch.randn(1, 3, 2, 2))
    assert calls == [1]  # the hook came along
    assert twin[0]._forward_hooks is not model[0]._forward_hooks
    assert twin[1].table is not model[1].table and twin[1].table[0] is not model[1].table[0]


def test_classes_that_customise_copying_keep_their_deepcopy():
    copied = []

    class Tagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def __deepcopy__(self, memo):
            copied.append(self)
            twin = Tagged()
            twin.lin = copy.deepcopy(self.lin, memo)
            return twin

    model = nn.Sequential(Tagged(), nn.ReLU())
    twin = copy_sharing(model, [])
    assert copied == [model[0]]
    assert twin[0].lin is not model[0].lin and torch.equal(twin[0].lin.weight, model[0].lin.weight)


def test_user_modules_are_copied_with_their_children():
    """torchvision's Bottleneck (a user class: settings + children) takes the fast path, and its
    copy behaves and is independent like a deepcopy."""
    model = torchvision.models.resnet50().layer1.eval()
    twin = copy_sharing(model, [])
    x = torch.randn(1, 64, 8, 8)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert type(twin[0]) is type(model[0]) and twin[0].stride == model[0].stride
    assert twin[0].downsample is not model[0].downsample
    assert twin[0].downsample[0].weight is not model[0].downsample[0].weight


def test_gather_equals_slicing_dim_by_dim():
    """The rewrite's one-pass gather of (out, in) kept channels equals index_select per dim."""
    from fxprune.passes.rewrite import _gather

    torch.manual_seed(0)
    for shape in [(8, 6, 3, 3), (8, 6, 1, 1), (8, 6), (8,), (4, 6, 2, 3, 3), (8, 1, 3, 3)]:
        t = torch.randn(shape)
        for dims in ({0: None}, {1: None}, {0: None, 1: None}):
            if max(dims) >= t.ndim:
                continue
            index = {d: torch.randperm(t.shape[d])[: max(1, t.shape[d] // 2)].sort().values for d in dims}
            expected = t
            for d, i in index.items():
                expected = expected.index_select(d, i)
            assert torch.equal(_gather(t, index), expected), (shape, sorted(dims))
