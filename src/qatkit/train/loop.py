"""The training loop: plain Python, top to bottom. One call trains one stage (float or QAT).

Sections: data loaders -> loss -> optimiser + schedule -> epochs of steps (clip, step, log) -> validation
-> early stopping -> restore the best weights. Later engines add guards and resume around these pieces.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..train_config import TrainConfig
from .metrics import classification_metrics
from .schedules import lr_multiplier


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    stopped_early: bool = False
    seconds: float = 0.0


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling depends only on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets over a whole loader, in eval mode."""
    was = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x))
        targets.append(y)
    model.train(was)
    return torch.cat(logits), torch.cat(targets)


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int) -> dict:
    logits, targets = predict(model, loader)
    return classification_metrics(logits, targets, num_classes)


def class_weight_tensor(spec, targets: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """``balanced`` -> n / (C * count_c) (as scikit-learn); a list -> that list; None -> None."""
    if spec is None:
        return None
    if spec == "balanced":
        counts = torch.bincount(targets, minlength=num_classes).float().clamp(min=1)
        return targets.numel() / (num_classes * counts)
    if len(spec) != num_classes:
        raise ValueError(f"class_weights has {len(spec)} values for {num_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Model weights with ``weight_decay``; quantizer step sizes (LSQ scales) without, so they do not shrink."""
    from ..nn.fake_quantizer import FakeQuantizer

    quant_ids = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in quant_ids], "weight_decay": weight_decay}]
    scales = [p for p in trainable if id(p) in quant_ids]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0})
    return groups


def score(metrics: dict, monitor: str) -> tuple[float, float]:
    """Sortable (primary, tie-break) pair where larger is better; ties on accuracy go to lower loss."""
    if monitor == "loss":
        return (-metrics["loss"], 0.0)
    return (metrics[monitor], -metrics["loss"])


def fit(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    *,
    num_classes: int,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    log_path: str | Path | None = None,
    desc: str = "train",
    progress: bool = True,
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs``; keep the weights of the best validation epoch."""
    result = FitResult()
    if cfg.epochs == 0:
        return result
    start = time.perf_counter()
    train_loader = make_loader(train_ds, batch_size, True, seed, num_workers)
    val_loader = make_loader(val_ds, 512, False) if val_ds is not None and len(val_ds) else None

    targets = torch.as_tensor([int(y) for _, y in train_ds]) if cfg.class_weights == "balanced" else None
    weight = class_weight_tensor(cfg.class_weights, targets, num_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.schedule, total, warmup, cfg.lr, cfg.end_lr, cfg.power)
    )
    clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf

    writer = _CsvLog(log_path) if log_path else None
    best_state, best_score, bad_epochs = None, None, 0
    bar = _Bar(desc, cfg.epochs * steps_per_epoch, progress)
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum, norm_sum, norm_max, n = 0.0, 0.0, 0.0, 0
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            n += len(y)
            norm_sum += grad_norm
            norm_max = max(norm_max, grad_norm)
            bar.advance(loss=float(loss.detach()), lr=optimizer.param_groups[0]["lr"])
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(n, 1),
            "grad_norm_mean": norm_sum / max(steps_per_epoch, 1),
            "grad_norm_max": norm_max,
        }
        if val_loader is not None:
            m = evaluate(model, val_loader, num_classes)
            row.update({"val_accuracy": m["accuracy"], "val_loss": m["loss"], "val_macro_f1": m["macro_f1"]})
            s = score(m, cfg.monitor)
            min_delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
            if (
                best_score is None
                or s[0] > best_score[0] + min_delta
                or (s[0] == best_score[0] and s[1] > best_score[1])
            ):
                best_state, best_score, bad_epochs = copy.deepcopy(model.state_dict()), s, 0
                result.best_epoch, result.best_metrics = epoch + 1, m
            else:
                bad_epochs += 1
            bar.note(f"val acc {m['accuracy']:.3f} loss {m['loss']:.3f}")
        row["seconds"] = time.perf_counter() - start
        result.history.append(row)
        if writer:
            writer.write(row)
        if cfg.early_stopping and val_loader is not None and bad_epochs >= cfg.early_stopping.patience:
            result.stopped_early = True
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.history)
    result.seconds = time.perf_counter() - start
    return result


class _CsvLog:
    """Append-only CSV, one row per epoch; the header is written from the first row's keys."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] | None = None

    def write(self, row: dict) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row) + [k for k in ("val_accuracy", "val_loss", "val_macro_f1") if k not in row]
        with self.path.open("w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


class _Bar:
    """A rich progress bar with loss, LR and the last validation result; silent when disabled."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total, info="")
        self.last = ""

    def advance(self, loss: float, lr: float) -> None:
        if self.progress:
            self.progress.update(self.task, advance=1, info=f"loss {loss:.4f} lr {lr:.2e} {self.last}")

    def note(self, text: str) -> None:
        self.last = text

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
