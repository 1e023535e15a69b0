"""What a training stage optimises and how it is validated: classification, or any task with the same methods.

The loop in ``loop.py`` only calls ``loss`` and ``evaluate``; a task decides what a batch is. Validation metrics
must include ``loss``; the collapse guard also uses ``accuracy`` when a task reports it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from .helpers import evaluate


class Task(Protocol):
    val_fields: list[str]
    val_batch_size: int

    def loss(self, model: nn.Module, batch, device: str) -> tuple[torch.Tensor, int]:
        """Mean loss of one batch and how many examples it averaged over."""
        ...

    def evaluate(self, model: nn.Module, loader: DataLoader, device: str) -> dict:
        """Validation metrics over a loader (eval mode), including ``loss``."""
        ...


class ClassificationTask:
    """Cross-entropy on ``(x, y)`` batches; accuracy, NLL and macro-F1 on validation."""

    val_fields = ["val_accuracy", "val_loss", "val_macro_f1"]
    val_batch_size = 512

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        self.num_classes = num_classes
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def loss(self, model: nn.Module, batch, device: str) -> tuple[torch.Tensor, int]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return self.loss_fn(model(x), y), len(y)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: str) -> dict:
        return evaluate(model, loader, self.num_classes, device)
