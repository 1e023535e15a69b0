"""The smart-pixel readout filter: two dense input branches, concatenated, dense layers, one logit (plain torch).

Mirrors the Keras model of an on-sensor track filter: the cluster's charge projected on x (``xz``) and on y
plus the module's y-local position (``yl``) each go through their own Dense(32), then four Dense layers to one
sigmoid output. Layer names follow the Keras ones, so a rule such as ``match: merged_dense*`` reads the same.
"""

from __future__ import annotations

import torch
from torch import nn


class SmartPixelNet(nn.Module):
    """``forward(xz (B, 22), yl (B, 14))`` -> high-pT logit (B, 1); the sigmoid is applied by the loss/task."""

    def __init__(self, xz_features: int = 22, yl_features: int = 14, branch: int = 32,
                 hidden: tuple[int, int, int] = (128, 64, 32)):  # fmt: skip
        super().__init__()
        h1, h2, h3 = hidden
        self.xz_dense1 = nn.Linear(xz_features, branch)
        self.yl_dense1 = nn.Linear(yl_features, branch)
        self.merged_dense1 = nn.Linear(2 * branch, h1)
        self.merged_dense2 = nn.Linear(h1, h2)
        self.merged_dense3 = nn.Linear(h2, h3)
        self.output_dense = nn.Linear(h3, 1)

    def forward(self, xz: torch.Tensor, yl: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.xz_dense1(xz)), torch.relu(self.yl_dense1(yl))], dim=1)
        h = torch.relu(self.merged_dense1(h))
        h = torch.relu(self.merged_dense2(h))
        h = torch.relu(self.merged_dense3(h))
        return self.output_dense(h)
