"""A MobileNetV2-style classifier (torchvision's layout, scaled down): inverted residual blocks of a 1x1
expansion conv, a 3x3 depthwise conv and a 1x1 linear projection, each followed by BatchNorm; ReLU6 after the
first two; a residual add where stride is 1 and the width is kept."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3, stride) -> project (1x1, linear); add the input when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv, inverted residual stages ``(expand, width, repeats, stride)``, a 1x1 head conv, global average
    pool, dropout and a linear classifier."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 6,
        stem: int = 16,
        last: int = 128,
        stages: Sequence[Sequence[int]] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 1)),
    ):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, stem, 3, 1)]
        c = stem
        for t, width, n, s in stages:
            for i in range(n):
                layers.append(InvertedResidual(c, width, s if i == 0 else 1, t))
                c = width
        layers.append(conv_bn(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(-2, -1)))
