"""edgetrain's small CIFAR-sized nets: a ResNet (He et al. 2016, CIFAR variant)."""

from __future__ import annotations

from torch import nn

from edgetrain.models import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):  # (N, Cin, H, W) -> (N, Cout, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3 stages of `depth` basic blocks at widths (w, 2w, 4w), global pool, linear head."""

    def __init__(self, depth: int = 3, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(depth):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # (N, 3, H, W) -> (N, K)
        x = self.layers(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


@register_model
def cifar_resnet20(num_classes: int = 10) -> nn.Module:
    return CifarResNet(depth=3, width=16, num_classes=num_classes)


@register_model
def cifar_resnet8(num_classes: int = 10) -> nn.Module:
    return CifarResNet(depth=1, width=16, num_classes=num_classes)
