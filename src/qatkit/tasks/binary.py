"""Binary classification: one logit and a sigmoid (or two logits and a softmax), a decision threshold;
accuracy, log loss, macro-F1, per-class recall, ROC-AUC and PR-AUC. Files agree when they make the same
decision at the threshold."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qatkit.tasks.base import Column, Task, decimal, percent
from qatkit.tasks.classification import class_weight_tensor, recall_and_f1, recall_cells, softmax_kl


def positive_probability(outputs: torch.Tensor) -> torch.Tensor:
    """P(positive) from (N,), (N, 1) logits (sigmoid) or (N, 2) logits (softmax)."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return torch.sigmoid(outputs.reshape(-1))
    if outputs.dim() == 2 and outputs.shape[1] == 2:
        return torch.softmax(outputs, 1)[:, 1]
    raise ValueError(f"task binary: the model returned shape {tuple(outputs.shape)}; expected (batch,) or (batch, 1) "
                     "logits (sigmoid) or (batch, 2) logits (softmax)")  # fmt: skip


class BinaryTask(Task):
    """Two classes, the second the positive one."""

    name = "binary"
    monitors = ("accuracy", "loss", "macro_f1", "roc_auc", "pr_auc")
    shares = frozenset({"accuracy", "macro_f1", "roc_auc", "pr_auc"})
    default_monitor = primary = "accuracy"

    def num_outputs(self) -> int:
        return 1

    def criterion(self, cfg, train_targets):
        weight = class_weight_tensor(cfg.class_weights, train_targets, 2)
        smoothing = cfg.label_smoothing

        def loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if outputs.dim() == 2 and outputs.shape[1] == 2:
                w = None if weight is None else weight.to(outputs.device)
                return F.cross_entropy(outputs, y.long(), weight=w, label_smoothing=smoothing)
            logits, t = outputs.reshape(-1), y.float().reshape(-1)
            t = t * (1 - smoothing) + 0.5 * smoothing
            w = None if weight is None else weight.to(outputs.device)[y.long().reshape(-1)]
            return F.binary_cross_entropy_with_logits(logits, t, weight=w)

        return loss

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """Two logits: as classification. One logit: the KL between the two Bernoulli distributions
        sigmoid(teacher / T) and sigmoid(student / T), times T², mean over the batch."""
        positive_probability(student.detach()[:1])  # refuses shapes the task cannot read
        if student.dim() == 2 and student.shape[1] == 2:
            return softmax_kl(student, teacher, temperature)
        s, t = student.float().reshape(-1) / temperature, teacher.float().reshape(-1) / temperature
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return kl.mean() * temperature**2

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        from sklearn.metrics import average_precision_score, roc_auc_score

        p = positive_probability(outputs.float()).double()
        y = targets.long().reshape(-1).numpy()
        pred = (p >= self.threshold).long().numpy()
        pc = p.clamp(1e-12, 1 - 1e-12)
        yt = torch.from_numpy(y).double()
        out = {
            "accuracy": float((pred == y).mean()),
            "loss": float(-(yt * pc.log() + (1 - yt) * (1 - pc).log()).mean()),
        }
        out.update(recall_and_f1(y, pred, 2))
        if len(np.unique(y)) == 2:
            out["roc_auc"] = float(roc_auc_score(y, p.numpy()))
            out["pr_auc"] = float(average_precision_score(y, p.numpy()))
        return out

    def agreement(self, outputs, reference) -> float:
        a = positive_probability(torch.as_tensor(np.asarray(outputs))) >= self.threshold
        b = positive_probability(torch.as_tensor(np.asarray(reference))) >= self.threshold
        return float((a == b).float().mean())

    def agreement_problem(self, value: float, cfg) -> str | None:
        if value < cfg.min_agreement:
            return f"decision agreement {100 * value:.2f}% < {100 * cfg.min_agreement:.0f}%"
        return None

    def columns(self) -> list[Column]:
        return [Column("accuracy %", percent("accuracy")), Column("log loss", decimal("loss")),
                Column("macro-F1 %", percent("macro_f1")), Column("ROC-AUC", decimal("roc_auc")),
                Column("PR-AUC", decimal("pr_auc")), Column("per-class recall", recall_cells)]  # fmt: skip
