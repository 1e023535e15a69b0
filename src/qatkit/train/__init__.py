"""Training: the loop, LR schedules and metrics."""

from ..train_config import EarlyStopping, TrainConfig
from .loop import FitResult, evaluate, fit, make_loader, predict
from .metrics import agreement, classification_metrics
from .schedules import SCHEDULES

__all__ = [
    "EarlyStopping",
    "TrainConfig",
    "FitResult",
    "SCHEDULES",
    "agreement",
    "classification_metrics",
    "evaluate",
    "fit",
    "make_loader",
    "predict",
]
