"""The paper's networks, LeNet-BN (Fig. 1) and VGG-BN (§4), and the CIFAR ResNets its future work names.

LeNet-BN and VGG-BN are plain ``nn.Sequential`` models with no biases and
BatchNorm without affine parameters, as in the paper. The ResNets (He et al.
2016) are written as users write them: a ``BasicBlock`` whose ``forward`` adds its
shortcut in place. Every hidden weight layer is followed by BatchNorm (Algorithm 1
assumes it).
"""

from collections import OrderedDict

import torch
from torch import nn

VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def lenet_bn(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """LeNet with BatchNorm for 32x32 input: cv1, cv2 (conv 5x5 + maxpool 2 + BN + ReLU), fc1, fc2 (+ BN + ReLU), fc3."""
    return nn.Sequential(OrderedDict([
        ("cv1", nn.Conv2d(in_channels, 6, 5, bias=False)),
        ("pool1", nn.MaxPool2d(2)),
        ("bn1", nn.BatchNorm2d(6, affine=False)),
        ("relu1", nn.ReLU()),
        ("cv2", nn.Conv2d(6, 16, 5, bias=False)),
        ("pool2", nn.MaxPool2d(2)),
        ("bn2", nn.BatchNorm2d(16, affine=False)),
        ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120, bias=False)),
        ("bn3", nn.BatchNorm1d(120, affine=False)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84, bias=False)),
        ("bn4", nn.BatchNorm1d(84, affine=False)),
        ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes, bias=False)),
    ]))


def vgg_bn(depth: int = 11, in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """VGG-BN for 32x32 input: 3x3 convs + BN + ReLU, max pools, then one Linear(512, num_classes)."""
    if depth not in VGG_CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
    features = []
    channels = in_channels
    for item in VGG_CONFIGS[depth]:
        if item == "M":
            features.append(nn.MaxPool2d(2))
        else:
            features += [nn.Conv2d(channels, item, 3, padding=1, bias=False),
                         nn.BatchNorm2d(item, affine=False), nn.ReLU()]
            channels = item
    return nn.Sequential(OrderedDict([
        ("features", nn.Sequential(*features)),
        ("flatten", nn.Flatten()),
        ("classifier", nn.Linear(512, num_classes, bias=False)),
    ]))


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic residual block, written as torchvision writes it: two 3x3 convs, BN after each,
    a 1x1-conv + BN projection shortcut where the shape changes, ``out += identity``, one ReLU module used twice."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, affine=affine)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, affine=affine)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels, affine=affine))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), §4.2: a 3x3 conv (16), three stages of n basic blocks (16, 32, 64
    channels, stride 2 at the start of the last two), global average pooling and one Linear; BN, no biases."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, affine: bool = True):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, ...), got {depth!r}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16, affine=affine)
        self.relu = nn.ReLU()
        stages, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(channels, width, stride, affine)]
            blocks += [BasicBlock(width, width, 1, affine) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes, bias=False)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet(depth: int = 20, in_channels: int = 3, num_classes: int = 10, affine: bool = True) -> ResNet:
    """CIFAR ResNet-``depth`` (6n+2: 20, 32, 44, 56, ...) of He et al. (2016) for 32x32 input."""
    return ResNet(depth, in_channels, num_classes, affine)
