"""Classification metrics from logits: accuracy, NLL, per-class recall, macro-F1, ROC-AUC (binary)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Metrics of one pass over a data set; ``logits`` (N, C) float, ``targets`` (N,) int."""
    from sklearn.metrics import f1_score, recall_score, roc_auc_score

    logits, targets = logits.float(), targets.long()
    y, pred = targets.numpy(), logits.argmax(1).numpy()
    labels = list(range(num_classes))
    out = {
        "accuracy": float((pred == y).mean()),
        "loss": float(F.cross_entropy(logits, targets)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class_recall": [float(r) for r in recall_score(y, pred, labels=labels, average=None, zero_division=0)],
    }
    if num_classes == 2 and len(np.unique(y)) == 2:
        out["roc_auc"] = float(roc_auc_score(y, torch.softmax(logits, 1)[:, 1].numpy()))
    return out


def agreement(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Share of rows whose top-1 class is the same in two sets of logits."""
    a, b = np.asarray(a), np.asarray(b)
    return float((a.argmax(1) == b.argmax(1)).mean())
