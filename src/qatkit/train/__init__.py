"""Training: the loop, LR schedules, guards, logging."""

from qatkit.tasks.base import predict
from qatkit.tasks.classification import agreement, class_weight_tensor, classification_metrics, evaluate
from qatkit.train.config import EarlyStopping, TrainConfig
from qatkit.train.loop import FitResult, fit, make_loader
from qatkit.train.schedules import SCHEDULES

__all__ = [
    "EarlyStopping",
    "TrainConfig",
    "FitResult",
    "SCHEDULES",
    "agreement",
    "class_weight_tensor",
    "classification_metrics",
    "evaluate",
    "fit",
    "make_loader",
    "predict",
]
