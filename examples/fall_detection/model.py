"""A small 1D-CNN fall detector on 3-axis accelerometer windows, one logit out (plain torch.nn).

Each block's Conv1d, BatchNorm1d and ReLU are separate attributes called in ``forward`` (not an nn.Sequential),
the way such detectors are usually written, so batch-norm folding has to find the conv -> bn pairs in the traced
graph rather than in a container.
"""

from __future__ import annotations

import torch
from torch import nn


class FallNet(nn.Module):
    """(B, 3, samples) accelerometer window in g -> fall logit (B, 1); apply a sigmoid for P(fall)."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, int, int] = (16, 32, 64), kernel_size: int = 7,
                 dropout: float = 0.2):  # fmt: skip
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv1d(in_channels, c1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(c1, c2, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool1d(2)
        self.conv3 = nn.Conv1d(c2, c3, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn3 = nn.BatchNorm1d(c3)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.classifier(self.dropout(x.mean(dim=-1)))
