"""A small 1D-CNN regressor: IMU window -> walking speed (plain torch.nn).

Three Conv1d -> BatchNorm1d -> ReLU blocks in an nn.Sequential (the usual way to write a feature stack),
global average pooling, then two Linear layers to one number per window.
"""

from __future__ import annotations

import torch
from torch import nn


class SpeedNet(nn.Module):
    """(B, 6, samples) accelerometer (g) + gyroscope (rad/s) window -> walking speed in m/s, shape (B,)."""

    def __init__(self, in_channels: int = 6, channels: tuple[int, int, int] = (16, 32, 32), kernel_size: int = 5,
                 hidden: int = 16):  # fmt: skip
        super().__init__()
        c1, c2, c3 = channels
        pad = kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, c1, kernel_size, padding=pad),
            nn.BatchNorm1d(c1),
            nn.ReLU(),
            nn.Conv1d(c1, c2, kernel_size, stride=2, padding=pad),
            nn.BatchNorm1d(c2),
            nn.ReLU(),
            nn.Conv1d(c2, c3, kernel_size, stride=2, padding=pad),
            nn.BatchNorm1d(c3),
            nn.ReLU(),
        )
        self.fc1 = nn.Linear(c3, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=-1)
        return self.fc2(torch.relu(self.fc1(h))).squeeze(-1)
