"""Knowledge distillation from a frozen teacher (the float model) into a training stage, for any task.

A stage with ``distill`` trains on ``(1 - weight) * task loss + weight * task.distill_loss(student, teacher, T)``.
The train split is wrapped so every item carries its row number; the teacher's outputs are then either computed
live on each batch (eval mode, no grad, float32) or looked up by row in a table computed once over the split.
Both are deterministic given the frozen teacher, so a resumed stage gives the losses of an uninterrupted one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from qatkit.base.batch import call, output_tensor, split_batch, to_device
from qatkit.tasks.base import SupervisedObjective
from qatkit.train.config import DistillConfig

CACHE_AUTO_BYTES = 256 * 2**20
"""``cache: auto`` keeps the teacher's train outputs when they take at most this much memory."""
CACHE_CHUNK = 512
"""Rows per teacher forward pass while the table is built."""


class Indexed(Dataset):
    """A data set whose items are ``(row, item)``: a shuffled batch says which rows it holds."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return i, self.ds[i]


class Teacher:
    """A frozen copy of a model (eval mode, no gradients) whose outputs a distilling stage learns from."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._table: tuple[Dataset, str, torch.Tensor | None] | None = None

    @torch.no_grad()
    def outputs(self, inputs, device: str) -> torch.Tensor:
        """The teacher's outputs on a batch's inputs, in float32 whatever autocast is on around it."""
        self.model.to(device)
        with torch.autocast(torch.device(device).type, enabled=False):
            return output_tensor(call(self.model, to_device(inputs, device))).float()

    def table(self, ds: Dataset, device: str, cache: bool | str) -> torch.Tensor | None:
        """The outputs for every row of ``ds`` in order (None: too large for ``cache: auto``, or ``false``)."""
        if cache is False:
            return None
        kept = self._table
        if kept is None or kept[0] is not ds or kept[1] != device or (kept[2] is None and cache is True):
            self._table = (ds, device, self._build(ds, device, cache == "auto"))
        return self._table[2]

    def _build(self, ds: Dataset, device: str, auto: bool) -> torch.Tensor | None:
        """Outputs over ``ds`` in chunks of consecutive rows (no DataLoader: the global RNG is left alone)."""
        n, chunks = len(ds), []
        for start in range(0, n, CACHE_CHUNK):
            inputs, _ = split_batch(default_collate([ds[i] for i in range(start, min(n, start + CACHE_CHUNK))]))
            out = self.outputs(inputs, device)
            if auto and not chunks and out.element_size() * out[0].numel() * n > CACHE_AUTO_BYTES:
                return None
            chunks.append(out)
        return torch.cat(chunks)


class DistillObjective(SupervisedObjective):
    """A task's objective whose training loss mixes in the distance to a teacher's outputs.

    Batches come from an :class:`Indexed` train split; validation is the task's own (metrics, not distillation).
    """

    train_fields = ("task_loss", "distill_loss")

    def __init__(self, base: SupervisedObjective, teacher: Teacher, cfg: DistillConfig, table: torch.Tensor | None):
        super().__init__(base.task, base.criterion, base.monitor)
        self.teacher, self.cfg, self.table = teacher, cfg, table
        self.parts: dict[str, torch.Tensor] = {}
        """The two parts of the last batch's loss (detached), for the epoch means in the log."""

    def loss(self, model: nn.Module, batch, device: str) -> tuple[torch.Tensor, int]:
        rows, inner = batch
        student, y = self.outputs(model, inner, device)
        task_loss = self.criterion(student, y)
        if self.table is not None:
            target = self.table[torch.as_tensor(rows).to(self.table.device)].to(device)
        else:
            target = self.teacher.outputs(split_batch(inner)[0], device)
        kd = self.task.distill_loss(student, target, self.cfg.temperature)
        w = self.cfg.weight
        self.parts = {"task_loss": task_loss.detach(), "distill_loss": kd.detach()}
        return (1 - w) * task_loss + w * kd, len(y)


def with_teacher(
    objective: SupervisedObjective, train_ds: Dataset, cfg: DistillConfig, teacher: Teacher | nn.Module, device: str
) -> tuple[DistillObjective, Indexed]:
    """The distilling objective of one stage and the train split it reads (items carry their row number)."""
    if not isinstance(objective, SupervisedObjective):
        raise ValueError(f"distill needs a supervised task; the objective is a {type(objective).__name__}")
    teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
    return DistillObjective(objective, teacher, cfg, teacher.table(train_ds, device, cfg.cache)), Indexed(train_ds)
