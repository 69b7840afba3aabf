"""Built-in experiment models of the papers, addressable as ``fxprune:NAME`` from the CLI.

* ``lenet5``: LeNet-5 as in the pruning papers, conv 20 - conv 50 - fc 500 - fc 10 (28x28 input).
* ``resnet20`` / ``resnet56``: CIFAR-style ResNets (16-32-64 channels, 3 stages of n basic blocks).
  Downsampling shortcuts are 1x1 conv + BN ("option B"): the zero-padding shortcut ("option A")
  pads the channel dim, which makes every stage a boundary for structured pruning.
* ``vgg_bn``: a small VGG with BatchNorm.
* ``mobilenetv2_mini``: a MobileNetV2-style net for 28x28 inputs: inverted residual blocks
  (1x1 expand x4 - 3x3 depthwise - 1x1 linear projection, residual add when the shape allows),
  widths 16-24-32-64, the depthwise convs tying each block's expansion channels into one group.
* ``inception_mini``: a stem and two Inception modules (1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1,
  concatenated), the small branch-pruning test bed of GAL's GoogLeNet experiment.

All take ``in_channels`` (1 for MNIST) and ``num_classes``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(in_channels, 20, 5), nn.Conv2d(20, 50, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1, self.fc2 = nn.Linear(50 * side * side, 500), nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGGBN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, cfg=(32, "M", 64, "M", 128, 128, "M")):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3: tuple, c5: tuple, cp: int):
        super().__init__()
        self.b1 = _conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(_conv_bn(cin, c3[0], 1), _conv_bn(c3[0], c3[1], 3))
        self.b5 = nn.Sequential(_conv_bn(cin, c5[0], 1), _conv_bn(c5[0], c5[1], 3), _conv_bn(c5[1], c5[1], 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, cp, 1))
        self.out_channels = c1 + c3[1] + c5[1] + cp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], 1)


class InceptionMini(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(in_channels, 32, 3)
        self.a = Inception(32, 16, (16, 32), (8, 16), 16)
        self.b = Inception(self.a.out_channels, 32, (32, 48), (8, 24), 24)
        self.fc = nn.Linear(self.b.out_channels, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = F.max_pool2d(self.a(x), 2)
        return self.fc(F.adaptive_avg_pool2d(self.b(x), 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                       nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2Mini(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        blocks, cin = [], 16
        for cout, stride, repeats in ((16, 1, 1), (24, 2, 2), (32, 2, 3), (64, 1, 2)):
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6())
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def lenet5(**kw) -> nn.Module:
    return LeNet5(**kw)


def resnet20(**kw) -> nn.Module:
    return CifarResNet(20, **kw)


def resnet56(**kw) -> nn.Module:
    return CifarResNet(56, **kw)


def vgg_bn(**kw) -> nn.Module:
    return VGGBN(**kw)


def inception_mini(**kw) -> nn.Module:
    return InceptionMini(**kw)


def mobilenetv2_mini(**kw) -> nn.Module:
    return MobileNetV2Mini(**kw)


NETS = {"lenet5": lenet5, "resnet20": resnet20, "resnet56": resnet56, "vgg_bn": vgg_bn,
        "inception_mini": inception_mini, "mobilenetv2_mini": mobilenetv2_mini}
INPUT_SHAPE = (1, 1, 28, 28)
