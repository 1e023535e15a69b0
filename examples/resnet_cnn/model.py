"""A tiny ResNet (the torchvision resnet18 layout, scaled down) for small RGB images (plain torch.nn).

BasicBlocks hold conv1/bn1/relu/conv2/bn2 as attributes and add the identity (or a 1x1 conv + BatchNorm
``downsample`` held in an nn.Sequential when the shape changes), exactly as torchvision writes them, including
one ``relu`` module called twice per block. Stem conv + bn + relu, ``layer1``..``layerN`` (nn.Sequential of
blocks, one per entry of ``widths``), global average pool, ``fc``. ``widths=(64, 128, 256, 512), blocks=(2, 2, 2,
2)`` is ResNet-18 with a 3x3 stem for 32x32 images (the CIFAR layout).
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
    """(B, in_channels, H, W) image -> class logits (B, num_classes); every stage after the first halves H and W."""

    def __init__(self, in_channels: int = 3, num_classes: int = 6, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: tuple[int, ...] = (1, 1, 1)):  # fmt: skip
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths} and blocks {blocks} need one entry per stage")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.stages = len(widths)
        for i, (channels, n) in enumerate(zip(widths, blocks, strict=True)):
            stage = self._stage(widths[max(i - 1, 0)], channels, n, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        first = BasicBlock(in_channels, channels, stride)
        return nn.Sequential(first, *(BasicBlock(channels, channels) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
