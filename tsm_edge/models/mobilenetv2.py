"""MobileNetV2-TSM in the official online demo's layout.

Module names match the demo's flat state_dict (``features.3.conv.0.weight``, ...,
``classifier.weight``) so its checkpoints load directly. The shift sits in every stride-1
residual block (10 blocks at width 1.0), before the block's ``conv``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .shift import TemporalShift


def _make_divisible(x: float, divisible_by: int = 8) -> int:
    import math
    return int(math.ceil(x * 1.0 / divisible_by) * divisible_by)


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU6(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, shift: bool = True):
        super().__init__()
        hidden = int(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        if expand_ratio == 1:
            layers = [
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
            ]
        else:
            layers = [
                nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
            ]
        self.conv = nn.Sequential(*layers)
        # The online demo shifts exactly the blocks with a residual connection.
        self.shift = TemporalShift() if (shift and self.use_res_connect) else None

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            branch = self.shift(x) if self.shift is not None else x
            return x + self.conv(branch)
        return self.conv(x)


DEFAULT_SETTING = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]

TINY_SETTING = [  # consecutive residual blocks of one shape, as in the full model
    [1, 8, 1, 1],
    [4, 16, 3, 2],
    [4, 24, 3, 2],
]


class MobileNetV2TSM(nn.Module):
    def __init__(self, num_classes: int = 27, width_mult: float = 1.0,
                 setting: list[list[int]] | None = None, input_channel: int = 32,
                 last_channel: int = 1280, shift: bool = True):
        super().__init__()
        setting = setting or DEFAULT_SETTING
        input_channel = int(input_channel * width_mult)
        self.last_channel = _make_divisible(last_channel * width_mult) if width_mult > 1.0 else last_channel
        features: list[nn.Module] = [conv_bn(3, input_channel, 2)]
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * width_mult) if t > 1 else c
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel,
                                                 s if i == 0 else 1, t, shift=shift))
                input_channel = output_channel
        features.append(conv_1x1_bn(input_channel, self.last_channel))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(self.last_channel, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.mean(3).mean(2)
        return self.classifier(x)


def tsm_mobilenetv2(num_classes: int = 27, shift: bool = True) -> MobileNetV2TSM:
    return MobileNetV2TSM(num_classes=num_classes, shift=shift)


def tsm_mobilenetv2_tiny(num_classes: int = 5, shift: bool = True) -> MobileNetV2TSM:
    return MobileNetV2TSM(num_classes=num_classes, setting=TINY_SETTING, input_channel=8,
                          last_channel=64, shift=shift)
