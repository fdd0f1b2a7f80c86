"""ResNet-TSM with torchvision-style bottlenecks (stride on conv2).

The shift sits at the start of every bottleneck's residual branch, before ``conv1``; the identity
path is not shifted (the official TSM "residual shift"). ResNet-50 has 16 shifted blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

from .shift import TemporalShift


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, shift: bool = True):
        super().__init__()
        self.shift = TemporalShift() if shift else None
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.shift(x) if self.shift is not None else x
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTSM(nn.Module):
    def __init__(self, layers: list[int], num_classes: int = 400, base_width: int = 64,
                 shift: bool = True):
        super().__init__()
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(base_width, layers[0], 1, shift)
        self.layer2 = self._make_layer(base_width * 2, layers[1], 2, shift)
        self.layer3 = self._make_layer(base_width * 4, layers[2], 2, shift)
        self.layer4 = self._make_layer(base_width * 8, layers[3], 2, shift)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(base_width * 8 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int, shift: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, shift)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, shift=shift) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def tsm_resnet50(num_classes: int = 400, shift: bool = True) -> ResNetTSM:
    return ResNetTSM([3, 4, 6, 3], num_classes=num_classes, shift=shift)


def tsm_resnet50_tiny(num_classes: int = 5, shift: bool = True) -> ResNetTSM:
    return ResNetTSM([1, 2, 1, 1], num_classes=num_classes, base_width=8, shift=shift)
