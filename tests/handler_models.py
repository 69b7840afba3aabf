"""One tiny model per handler kind, each with a prunable group that goes through that op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin, cout, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.Conv1d(8, 4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.Conv3d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.bn(self.a(x))))


class Depthwise(nn.Module):
    def __init__(self, mult=1):
        super().__init__()
        self.a = cbr(3, 8)
        self.dw = nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8 * mult)
        self.b = nn.Conv2d(8 * mult, 4, 1)

    def forward(self, x):
        return self.b(F.relu6(self.bn(self.dw(self.a(x)))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 12)
        self.g = nn.Conv2d(12, 16, 3, padding=1, groups=4)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(F.silu(self.g(self.a(x))))


class Transposed(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.a = cbr(3, 8)
        self.t = nn.ConvTranspose2d(8, 12, 2, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(12)
        self.b = nn.ConvTranspose2d(12, 4, 3)

    def forward(self, x):
        return self.b(F.relu(self.bn(self.t(self.a(x)))))


class FlattenLinear(nn.Module):
    def __init__(self, literal=False):
        super().__init__()
        self.a = cbr(3, 8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1, self.fc2 = nn.Linear(32, 16), nn.Linear(16, 5)
        self.drop = nn.Dropout(0.5)
        self.literal = literal

    def forward(self, x):
        y = self.pool(self.a(x))
        y = y.view(y.size(0), 32) if self.literal else self.flatten(y)
        return self.fc2(self.drop(F.gelu(self.fc1(y))))


class Residual(nn.Module):
    def __init__(self, op="add"):
        super().__init__()
        self.stem = cbr(3, 8)
        self.f = nn.Sequential(cbr(8, 6), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 8, 1, stride=2), nn.BatchNorm2d(8))
        self.g = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)
        self.op = op

    def forward(self, x):
        x = self.stem(x)
        if self.op == "add":
            x = F.relu(x + self.f(x))
        elif self.op == "sub":
            x = torch.sub(x, self.f(x))
        elif self.op == "iadd":
            y = self.f(x)
            y += x
            x = y
        x = self.down(x) + self.g(x)
        return self.head(x)



class ResidualClassifier(nn.Module):
    """`Residual` with a pooled linear head: a classifier, so training losses make sense."""

    def __init__(self):
        super().__init__()
        self.body = Residual()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.a = cbr(3, 16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.b = nn.Conv2d(16, 4, 1)
        self.functional = functional

    def forward(self, x):
        x = self.a(x)
        s = x.mean((2, 3), keepdim=True) if self.functional else F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return self.b(x * s if not self.functional else torch.mul(s, x) / 2.0)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 6), cbr(3, 5), cbr(3, 4)
        self.inner = cbr(5, 3)
        self.head = nn.Conv2d(6 + 3 + 4 + 6, 4, 1)

    def forward(self, x):
        a = self.a(x)
        inner = torch.cat([a, self.inner(self.b(x))], dim=1)  # nested concat
        return self.head(torch.cat((inner, self.c(x), a), 1))


class SplitChunk(nn.Module):
    def __init__(self, how="split"):
        super().__init__()
        self.a = cbr(3, 12)
        self.l, self.r = nn.Conv2d(5, 4, 1), nn.Conv2d(7, 4, 1)
        self.how = how

    def forward(self, x):
        y = self.a(x)
        if self.how == "split":
            p, q = torch.split(y, [5, 7], dim=1)
        elif self.how == "getitem":
            p, q = y[:, :5], y[:, 5:]
        elif self.how == "narrow":
            p, q = y.narrow(1, 0, 5), torch.narrow(y, 1, 5, 7)
        else:
            raise ValueError(self.how)
        return self.l(p) + self.r(q)


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 12)
        self.l, self.r = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        return self.l(p) * self.r(q)


class ChannelsLast(nn.Module):
    """ConvNeXt-style: dwconv -> permute -> LayerNorm -> Linear -> GELU -> Linear -> scale -> permute."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.ln = nn.LayerNorm(8)
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.scale = nn.Parameter(torch.ones(8) * 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.ln(y)))) * self.scale
        return self.head(x + y.permute(0, 3, 1, 2))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(4, 12)
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


class InstanceNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.act = nn.PReLU(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.act(self.inorm(self.a(x))))


class Functional(nn.Module):
    """Raw parameters used through torch.nn.functional."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.bn_w, self.bn_b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("rm", torch.randn(8) * 0.1)
        self.register_buffer("rv", torch.rand(8) + 0.5)
        self.w2 = nn.Parameter(torch.randn(12, 8, 1, 1) * 0.3)
        self.gn_w, self.gn_b = nn.Parameter(torch.rand(12) + 0.5), nn.Parameter(torch.randn(12) * 0.1)
        self.lw = nn.Parameter(torch.randn(5, 12) * 0.3)

    def forward(self, x):
        y = F.conv2d(x, self.w1, self.b1, 1, 1)
        y = F.relu(F.batch_norm(y, self.rm, self.rv, self.bn_w, self.bn_b, False))
        y = F.group_norm(F.conv2d(y, self.w2), 3, self.gn_w, self.gn_b)
        y = F.adaptive_max_pool2d(F.hardswish(y), 1).flatten(1)
        return F.linear(y, self.lw)


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = nn.functional.max_pool2d(self.a(x), 2)
        y = F.interpolate(F.avg_pool2d(y, 1), scale_factor=2.0, mode="nearest")
        y = F.pad(torch.tanh(self.b(y)), (1, 1, 1, 1))
        y = F.leaky_relu(F.hardtanh(y.clamp(min=-1.0)), 0.1).contiguous()
        return self.c(F.dropout(y, 0.2, training=False))


class NestedOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b, self.c = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        from collections import namedtuple

        Pair = namedtuple("Pair", "main aux")
        return {"out": self.b(y), "extra": [Pair(self.c(y), self.c(y).sum((2, 3)))]}


class SharedModule(nn.Module):
    """One conv called twice: its input and output channels become one group."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(F.relu(self.shared(F.relu(self.shared(y)))))


class TinyUNet(nn.Module):
    """Encoder-decoder with a transposed-conv upsample and a skip concat."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = cbr(3, 8), cbr(8, 12)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.dec = cbr(6 + 8, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        d = self.dec(torch.cat([self.up(e2), e1], dim=1))
        return self.out(d)


class RepeatAlongSpace(nn.Module):
    """repeat_interleave along H (method and function forms) keeps the channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x)).repeat_interleave(2, dim=2)
        return self.b(torch.repeat_interleave(y, 2, dim=-1))


HANDLER_MODELS = {
    "repeat_interleave": (RepeatAlongSpace, (2, 3, 4, 4)),
    "shared_module": (SharedModule, (2, 3, 8, 8)),
    "unet_upsample_skip": (TinyUNet, (2, 3, 8, 8)),
    "conv1d": (Conv1dNet, (2, 3, 16)),
    "conv3d": (Conv3dNet, (2, 3, 6, 6, 6)),
    "depthwise": (Depthwise, (2, 3, 8, 8)),
    "depthwise_multiplier": (lambda: Depthwise(mult=2), (2, 3, 8, 8)),
    "grouped": (Grouped, (2, 3, 8, 8)),
    "conv_transpose": (Transposed, (2, 3, 6, 6)),
    "conv_transpose_grouped": (lambda: Transposed(groups=4), (2, 3, 6, 6)),
    "flatten_linear": (FlattenLinear, (2, 3, 8, 8)),
    "view_literal_linear": (lambda: FlattenLinear(literal=True), (2, 3, 8, 8)),
    "residual_add": (Residual, (2, 3, 8, 8)),
    "residual_sub": (lambda: Residual("sub"), (2, 3, 8, 8)),
    "residual_iadd": (lambda: Residual("iadd"), (2, 3, 8, 8)),
    "se_mul": (SqueezeExcite, (2, 3, 8, 8)),
    "se_functional_mul_div": (lambda: SqueezeExcite(functional=True), (2, 3, 8, 8)),
    "concat": (Concat, (2, 3, 8, 8)),
    "split": (SplitChunk, (2, 3, 8, 8)),
    "getitem_slice": (lambda: SplitChunk("getitem"), (2, 3, 8, 8)),
    "narrow": (lambda: SplitChunk("narrow"), (2, 3, 8, 8)),
    "chunk": (Chunk, (2, 3, 8, 8)),
    "channels_last_layernorm": (ChannelsLast, (2, 3, 8, 8)),
    "groupnorm": (GroupNormNet, (2, 3, 8, 8)),
    "instancenorm_prelu": (InstanceNormNet, (2, 3, 8, 8)),
    "functional_forms": (Functional, (2, 3, 8, 8)),
    "pool_interp_pad_act": (Pools, (2, 3, 8, 8)),
    "nested_outputs": (NestedOutputs, (2, 3, 8, 8)),
}
