"""Regression: mean squared error; MSE, MAE and R². An exported file is compared with its source model by the
relative error of its outputs (RMS difference over the spread of the source's outputs), not by top-1 class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qatkit.tasks.base import Column, Task, decimal


def _match(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and targets as (N, k) float tensors; (N,) and (N, 1) are the same thing."""
    o, t = outputs.float().reshape(len(outputs), -1), targets.float().reshape(len(targets), -1)
    if o.shape != t.shape:
        raise ValueError(f"task regression: the model returned shape {tuple(outputs.shape)} for targets of shape "
                         f"{tuple(targets.shape)}")  # fmt: skip
    return o, t


def relative_error(outputs, reference) -> float:
    """RMS of ``outputs - reference`` divided by the standard deviation of ``reference`` (0 = identical)."""
    a = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    b = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    spread = float(b.std()) or 1.0
    return float(np.sqrt(np.mean((a - b) ** 2)) / spread)


class RegressionTask(Task):
    """Continuous targets, shape (N,) or (N, k)."""

    name = "regression"
    monitors = ("loss", "mae", "r2")
    lower_better = frozenset({"loss", "mae"})
    shares = frozenset()
    default_monitor = "loss"
    primary = "r2"
    agreement_header = "rel. error %"
    exact_agreement = 0.0
    classes = False

    def __init__(self, num_classes: int = 0, class_names=None, threshold: float = 0.5, num_targets: int = 1):
        super().__init__(0, [], threshold)
        self.num_targets = num_targets

    def num_outputs(self) -> int:
        return self.num_targets

    def criterion(self, cfg, train_targets):
        if cfg.class_weights is not None or cfg.label_smoothing:
            raise ValueError("task regression has no classes: class_weights and label_smoothing do not apply")

        def loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(*_match(outputs, y))

        return loss

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """MSE between the two models' outputs (the temperature does not apply)."""
        return F.mse_loss(*_match(student, teacher))

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        o, t = _match(outputs, targets)
        resid = ((o - t) ** 2).sum(0)
        total = ((t - t.mean(0)) ** 2).sum(0).clamp(min=1e-12)
        return {"loss": float(F.mse_loss(o, t)), "mae": float((o - t).abs().mean()),
                "r2": float((1 - resid / total).mean())}  # fmt: skip

    def agreement(self, outputs, reference) -> float:
        return relative_error(outputs, reference)

    def agreement_problem(self, value: float, cfg) -> str | None:
        if value > cfg.max_rel_error:
            return f"relative error {100 * value:.2f}% > {100 * cfg.max_rel_error:.1f}%"
        return None

    def columns(self) -> list[Column]:
        return [Column("test MSE", decimal("loss", 5)), Column("MAE", decimal("mae")), Column("R²", decimal("r2"))]
