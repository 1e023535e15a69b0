"""A tiny ResNet (the torchvision resnet18 layout, scaled down) for small RGB images (plain torch.nn).

BasicBlocks hold conv1/bn1/relu/conv2/bn2 as attributes and add the identity (or a 1x1 conv + BatchNorm
``downsample`` held in an nn.Sequential when the shape changes), exactly as torchvision writes them, including
one ``relu`` module called twice per block. Stem conv + bn + relu, ``layer1``..``layer3`` (nn.Sequential of
blocks), global average pool, ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """(B, in_channels, H, W) image -> class logits (B, num_classes); layer2 and layer3 halve H and W."""

    def __init__(self, in_channels: int = 3, num_classes: int = 6, widths: tuple[int, int, int] = (16, 32, 64),
                 blocks: tuple[int, int, int] = (1, 1, 1)):  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[0], blocks[0], stride=1)
        self.layer2 = self._stage(widths[0], widths[1], blocks[1], stride=2)
        self.layer3 = self._stage(widths[1], widths[2], blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        first = BasicBlock(in_channels, channels, stride)
        return nn.Sequential(first, *(BasicBlock(channels, channels) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
