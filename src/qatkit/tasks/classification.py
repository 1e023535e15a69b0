"""Classification into C classes from C logits: cross-entropy (class weights, label smoothing); accuracy, NLL,
macro-F1 and per-class recall; exported files agree when their top-1 class is the source model's."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qatkit.tasks.base import Column, Task, decimal, percent


def class_weight_tensor(spec, targets: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """``balanced`` -> n / (C * count_c) (as scikit-learn); a list -> that list; None -> None."""
    if spec is None:
        return None
    if spec == "balanced":
        counts = torch.bincount(targets.long().reshape(-1), minlength=num_classes).float().clamp(min=1)
        return targets.numel() / (num_classes * counts)
    if len(spec) != num_classes:
        raise ValueError(f"class_weights has {len(spec)} values for {num_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: KL(softmax(teacher / T) || softmax(student / T)) * T², mean over the batch."""
    log_q = F.log_softmax(student.float() / temperature, -1)
    log_p = F.log_softmax(teacher.float() / temperature, -1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


CONFUSION_MAX_CLASSES = 32
"""Metrics carry the confusion matrix (rows: true class, columns: predicted) up to this many classes."""


def recall_and_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    from sklearn.metrics import confusion_matrix, f1_score, recall_score

    labels = list(range(num_classes))
    out = {
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class_recall": [float(r) for r in recall_score(y, pred, labels=labels, average=None, zero_division=0)],
    }
    if num_classes <= CONFUSION_MAX_CLASSES:
        out["confusion"] = confusion_matrix(y, pred, labels=labels).tolist()
    return out


def recall_cells(m: dict) -> str:
    return " ".join(f"{x:.2f}" for x in m.get("per_class_recall", []))


class ClassificationTask(Task):
    """C logits, softmax."""

    name = "classification"
    monitors = ("accuracy", "loss", "macro_f1")
    shares = frozenset({"accuracy", "macro_f1"})
    default_monitor = primary = "accuracy"

    def num_outputs(self) -> int:
        return self.num_classes

    def criterion(self, cfg, train_targets):
        weight = class_weight_tensor(cfg.class_weights, train_targets, self.num_classes)
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

        def loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.check_shape(outputs)
            return loss_fn(outputs, y)

        return loss

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        self.check_shape(student)
        return softmax_kl(student, teacher, temperature)

    def check_shape(self, outputs: torch.Tensor) -> None:
        if outputs.dim() != 2 or outputs.shape[1] != self.num_classes:
            hint = "; for one logit and a sigmoid use task: binary" if outputs.shape[-1:] == (1,) else ""
            raise ValueError(f"task classification: the model returned shape {tuple(outputs.shape)}; expected "
                             f"(batch, {self.num_classes}) logits for {self.num_classes} classes{hint}")  # fmt: skip

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        self.check_shape(outputs)
        y, pred = targets.long().numpy(), outputs.argmax(1).numpy()
        out = {"accuracy": float((pred == y).mean()), "loss": float(F.cross_entropy(outputs, targets.long()))}
        out.update(recall_and_f1(y, pred, self.num_classes))
        return out

    def agreement(self, outputs, reference) -> float:
        return float((np.asarray(outputs).argmax(1) == np.asarray(reference).argmax(1)).mean())

    def agreement_problem(self, value: float, cfg) -> str | None:
        if value < cfg.min_agreement:
            return f"top-1 agreement {100 * value:.2f}% < {100 * cfg.min_agreement:.0f}%"
        return None

    def columns(self) -> list[Column]:
        return [Column("accuracy %", percent("accuracy")), Column("test NLL", decimal("loss")),
                Column("macro-F1 %", percent("macro_f1")), Column("per-class recall", recall_cells)]  # fmt: skip


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Metrics of C-class logits against integer targets (ROC-AUC added for two classes)."""
    out = ClassificationTask(num_classes).metrics(logits.float(), targets)
    y = targets.long().numpy()
    if num_classes == 2 and len(np.unique(y)) == 2:
        from sklearn.metrics import roc_auc_score

        out["roc_auc"] = float(roc_auc_score(y, torch.softmax(logits.float(), 1)[:, 1].numpy()))
    return out


def evaluate(model: nn.Module, loader, num_classes: int, device: str = "cpu") -> dict:
    """Classification metrics of ``model`` over a loader."""
    from qatkit.tasks.base import predict

    logits, targets = predict(model, loader, device)
    return classification_metrics(logits, targets, num_classes)


def agreement(a, b) -> float:
    """Share of rows whose top-1 class is the same in two sets of logits."""
    return float((np.asarray(a).argmax(1) == np.asarray(b).argmax(1)).mean())
