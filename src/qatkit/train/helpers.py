"""Pieces the training loop uses: evaluation, optimiser groups, state snapshots, LR rollback, signals, progress."""

from __future__ import annotations

import copy
import signal
import threading
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qatkit.nn.fake_quantizer import FakeQuantizer


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling depends only on ``seed`` (for evaluation and calibration)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers)


def param_groups(model: nn.Module, weight_decay: float, quant_lr: float | None = None) -> list[dict]:
    """Model weights with ``weight_decay``; quantizer step sizes (LSQ scales) without it (so they do not
    shrink) and at ``quant_lr`` when given."""
    quant_ids = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in quant_ids], "weight_decay": weight_decay}]
    scales = [p for p in trainable if id(p) in quant_ids]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, **({"lr": quant_lr} if quant_lr else {})})
    return groups


def score(metrics: dict, monitor: str, lower_is_better: bool = False) -> tuple[float, float]:
    """Sortable (primary, tie-break) pair where larger is better; ties on the monitored metric go to lower loss."""
    value = -metrics[monitor] if lower_is_better else metrics[monitor]
    return (value, 0.0 if monitor == "loss" else -metrics["loss"])


def snapshot(model, optimizer, scheduler, **position) -> dict:
    """In-memory copy of the trainable state plus where in training it was taken."""
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()), **position}  # fmt: skip


def restore(snap: dict, model, optimizer, scheduler) -> None:
    model.load_state_dict(snap["model"])
    optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    scheduler.load_state_dict(copy.deepcopy(snap["scheduler"]))


def scale_lr(optimizer, scheduler, factor: float, bases: list[float] | None = None, lrs: list[float] | None = None):
    """Set every group's LR (and the scheduler's base LRs) to ``factor`` times ``bases``/``lrs`` (default: the
    current ones). Used after a rollback (so cuts accumulate) and when a resumed recipe changes the LR."""
    cur_bases = list(getattr(scheduler, "base_lrs", []))
    bases = bases if bases is not None else cur_bases
    lrs = lrs if lrs is not None else [g["lr"] for g in optimizer.param_groups]
    if cur_bases:
        ratios = [b * factor / old for b, old in zip(bases, cur_bases, strict=True)]
        scheduler.base_lrs = [b * factor for b in bases]
        for g, r in zip(optimizer.param_groups, ratios, strict=True):
            g["lr"] *= r
    else:
        for g, lr in zip(optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr * factor


def retain(ckpt_dir: Path | None, keep: int, newer_than: int | None = None) -> None:
    """Keep the newest ``keep`` step checkpoints; with ``newer_than``, also drop those past that step (after a
    rollback they belong to an abandoned trajectory and must not be resumed from)."""
    if ckpt_dir is None:
        return
    steps = sorted(ckpt_dir.glob("step-*.safetensors"))
    doomed = steps[:-keep] if keep else steps
    if newer_than is not None:
        doomed += [p for p in steps if int(p.stem.split("-")[1]) > newer_than]
    for old in doomed:
        old.unlink(missing_ok=True)


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked at step boundaries (main thread only)."""

    def __init__(self):
        self.flag = False
        self.saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


class ProgressBar:
    """A rich progress bar with ETA, loss, LR and the last validation result; silent when disabled."""

    def __init__(self, desc: str, total: int, enabled: bool, done: int = 0):
        self.progress = None
        self.last = ""
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), transient=True,
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total, info="", completed=done)

    def advance(self, loss: float, lr: float) -> None:
        if self.progress:
            self.progress.update(self.task, advance=1, info=f"loss {loss:.4f} lr {lr:.2e} {self.last}")

    def note(self, text: str) -> None:
        self.last = text

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
