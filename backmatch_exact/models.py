"""The paper's networks: LeNet-BN (Fig. 1) and VGG-BN (§4), as plain ``nn.Sequential`` models.

No biases and BatchNorm without affine parameters, as in the paper; every hidden
weight layer is followed by BatchNorm (Algorithm 1 assumes it).
"""

from collections import OrderedDict

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
