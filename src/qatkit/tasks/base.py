"""What a model learns and how it is judged: a task owns its loss, metrics, predictions, the agreement of two
models' outputs (a PyTorch model and a file exported from it) and its report columns.

Tasks register themselves by ``name`` (``task:`` in a recipe); adding a task touches one file. The training
loop sees an :class:`Objective` (``loss`` and ``evaluate`` over batches), which the LM distillation task
(``lm/kd_task.py``) implements too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from qatkit.base.batch import call, output_tensor, split_batch, to_device

TASKS: dict[str, type[Task]] = {}
"""Task name -> class; filled by subclasses as they are defined."""


class Objective(Protocol):
    """What the training loop needs: a batch's loss, validation metrics, and which metric picks the best epoch."""

    val_fields: list[str]
    val_batch_size: int
    monitor: str

    def loss(self, model: nn.Module, batch, device: str) -> tuple[torch.Tensor, int]: ...

    def evaluate(self, model: nn.Module, loader: DataLoader, device: str) -> dict: ...

    def lower_is_better(self, metric: str) -> bool: ...

    def collapse_points(self, metrics: dict) -> float | None:
        """The monitored metric in points (percent) for the collapse guard, or None where it does not apply."""
        ...


class Column:
    """A report column: header and how a metrics dict is shown in it."""

    def __init__(self, header: str, show: Callable[[dict], str]):
        self.header, self.show = header, show


def percent(key: str) -> Callable[[dict], str]:
    return lambda m: f"{100 * m[key]:.2f}" if key in m else ""


def decimal(key: str, digits: int = 4) -> Callable[[dict], str]:
    return lambda m: f"{m[key]:.{digits}f}" if key in m else ""


class Task:
    """Base of every supervised task. Subclasses set the class attributes and implement the methods below."""

    name: ClassVar[str] = ""
    monitors: ClassVar[tuple[str, ...]] = ("loss",)
    """Metrics a training stage may ``monitor`` (early stopping, best epoch, collapse guard)."""
    lower_better: ClassVar[frozenset[str]] = frozenset({"loss"})
    shares: ClassVar[frozenset[str]] = frozenset()
    """Metrics that are shares in [0, 1]: the collapse guard watches them in points."""
    default_monitor: ClassVar[str] = "loss"
    primary: ClassVar[str] = "loss"
    """The metric parity and the report's checks compare between a model and its files and stages."""
    agreement_header: ClassVar[str] = "top-1 agree %"
    exact_agreement: ClassVar[float] = 1.0
    """The agreement of a file that computes exactly what its source model does (a share: 1; an error: 0)."""
    classes: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            TASKS[cls.name] = cls

    def __init__(self, num_classes: int = 0, class_names: list[str] | None = None, threshold: float = 0.5):
        self.num_classes = num_classes
        self.class_names = list(class_names or [])
        self.threshold = threshold

    # ---- what subclasses implement ------------------------------------------------------------------
    def num_outputs(self) -> int:
        """Outputs a bundled model gets for this task."""
        raise NotImplementedError

    def criterion(
        self, cfg, train_targets: torch.Tensor | None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The training loss of one stage (its class weights, label smoothing)."""
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """Metrics of one pass over a data set (includes ``loss``)."""
        raise NotImplementedError

    def agreement(self, outputs: torch.Tensor, reference: torch.Tensor) -> float:
        """How closely an exported file's outputs follow its source model's (shown in the agreement column)."""
        raise NotImplementedError

    def agreement_problem(self, value: float, cfg) -> str | None:
        """Why an integer file's agreement fails the export config's limit, or None."""
        raise NotImplementedError

    def columns(self) -> list[Column]:
        raise NotImplementedError

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """How far a student's outputs are from a teacher's on the same batch (knowledge distillation)."""
        raise NotImplementedError(f"task {self.name!r} has no distillation loss (Task.distill_loss)")

    # ---- shared -------------------------------------------------------------------------------------
    def check_monitor(self, monitor: str) -> str:
        if monitor not in self.monitors:
            raise ValueError(f"monitor {monitor!r} is not a metric of task {self.name!r}; allowed: "
                             f"{', '.join(self.monitors)}")  # fmt: skip
        return monitor

    def objective(self, cfg, train_targets: torch.Tensor | None = None) -> SupervisedObjective:
        """The loop's view of this task for one training stage (``cfg``: its TrainConfig)."""
        monitor = self.check_monitor(cfg.monitor or self.default_monitor)
        return SupervisedObjective(self, self.criterion(cfg, train_targets), monitor)

    def primary_drop(self, source: dict, exported: dict) -> float:
        """How much the primary metric fell from ``source`` to ``exported`` (positive = worse)."""
        diff = exported[self.primary] - source[self.primary]
        return diff if self.primary in self.lower_better else -diff


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and targets over a whole loader, in eval mode (float32, on the CPU)."""
    was = model.training
    model.eval()
    outs, targets = [], []
    for batch in loader:
        inputs, y = split_batch(batch)
        outs.append(output_tensor(call(model, to_device(inputs, device))).float().cpu())
        targets.append(torch.as_tensor(y))
    model.train(was)
    return torch.cat(outs), torch.cat(targets)


class SupervisedObjective:
    """A task's loss on ``(inputs, target)`` batches and its metrics on validation."""

    val_batch_size = 512

    def __init__(self, task: Task, criterion, monitor: str):
        self.task, self.criterion, self.monitor = task, criterion, monitor
        self.val_fields = [f"val_{k}" for k in task.monitors]

    def loss(self, model: nn.Module, batch, device: str) -> tuple[torch.Tensor, int]:
        outputs, y = self.outputs(model, batch, device)
        return self.criterion(outputs, y), len(y)

    def outputs(self, model: nn.Module, batch, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's outputs on a batch's inputs, and its targets, on ``device``."""
        inputs, y = split_batch(batch)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        return output_tensor(call(model, to_device(inputs, device))), y

    def evaluate(self, model: nn.Module, loader: DataLoader, device: str) -> dict:
        outputs, targets = predict(model, loader, device)
        return self.task.metrics(outputs, targets)

    def lower_is_better(self, metric: str) -> bool:
        return metric in self.task.lower_better

    def collapse_points(self, metrics: dict) -> float | None:
        return 100 * metrics[self.monitor] if self.monitor in self.task.shares else None
