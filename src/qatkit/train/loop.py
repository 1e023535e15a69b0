"""The training loop: one call trains one stage (float or QAT), top to bottom.

Set-up (data, loss, optimiser, schedule, guards, logging, resume) -> for each epoch: steps (autocast, backward,
clip, non-finite guard, step, checkpoint, signal check) -> validation (collapse guard, plateau, early stopping,
last/best checkpoints) -> restore the best weights. Checkpoints hold everything needed to continue exactly.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..nn.fake_quantizer import FakeQuantizer
from ..train_config import TrainConfig
from .distributed import DistInfo, GlobalBatchSampler, any_true, current
from .guards import Guards, Intervention, TrainingDiverged
from .logger import RunLogger
from .metrics import classification_metrics
from .schedules import lr_multiplier
from .state import load_training_state, save_training_state


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved to ``checkpoint`` and the run can resume from it."""

    def __init__(self, checkpoint: Path | None, step: int):
        where = f"; resume with --resume auto (checkpoint {checkpoint})" if checkpoint else ""
        super().__init__(f"interrupted at step {step}{where}")
        self.checkpoint = checkpoint


@dataclass
class LoaderOptions:
    """DataLoader settings (seed 002 item 7)."""

    num_workers: int = 0
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    pin_memory: bool = False


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    stopped_early: bool = False
    gave_up: str | None = None
    interventions: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling depends only on ``seed`` (for evaluation and calibration)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets over a whole loader, in eval mode."""
    was = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    model.train(was)
    return torch.cat(logits), torch.cat(targets)


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: str = "cpu") -> dict:
    logits, targets = predict(model, loader, device)
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


def score(metrics: dict, monitor: str) -> tuple[float, float]:
    """Sortable (primary, tie-break) pair where larger is better; ties on accuracy go to lower loss."""
    if monitor == "loss":
        return (-metrics["loss"], 0.0)
    return (metrics[monitor], -metrics["loss"])


def _quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


def _snapshot(model, optimizer, scheduler) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict())}  # fmt: skip


def _restore(snap: dict, model, optimizer, scheduler) -> None:
    model.load_state_dict(snap["model"])
    optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    scheduler.load_state_dict(copy.deepcopy(snap["scheduler"]))


def _rollback(optimizer, scheduler, restore, factor: float) -> tuple[float, float]:
    """Restore an earlier state, then set the LR to ``factor`` times what the current run had at that step:
    successive rollbacks keep cutting instead of returning to the snapshot's LR. Returns (before, after)."""
    before = optimizer.param_groups[0]["lr"]
    lrs = [g["lr"] for g in optimizer.param_groups]
    bases = list(getattr(scheduler, "base_lrs", []))
    restore()
    if bases:
        ratios = [b * factor / old for b, old in zip(bases, scheduler.base_lrs, strict=True)]
        scheduler.base_lrs = [b * factor for b in bases]
        for g, r in zip(optimizer.param_groups, ratios, strict=True):
            g["lr"] *= r
    else:
        for g, lr in zip(optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr * factor
    return before, optimizer.param_groups[0]["lr"]


class _StopSignal:
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


def fit(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    *,
    num_classes: int,
    batch_size: int,
    seed: int = 0,
    loader: LoaderOptions | None = None,
    run_dir: str | Path | None = None,
    stage: str = "train",
    resume: str | Path | None = None,
    fingerprint: dict | None = None,
    device: str = "cpu",
    progress: bool = True,
    on_epoch_start=None,
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs``; keep the weights of the best validation epoch.

    With ``run_dir``, writes ``<stage>_train.csv``, TensorBoard scalars and training-state checkpoints under
    ``run_dir/checkpoints/<stage>/``; ``resume`` continues from such a checkpoint exactly.
    ``on_epoch_start(epoch, model)`` is a test hook (e.g. to inject a fault).
    """
    result = FitResult()
    if cfg.epochs == 0:
        return result
    start = time.perf_counter()
    info: DistInfo = current()
    opts = loader or LoaderOptions()
    ckpt_dir = Path(run_dir) / "checkpoints" / stage if run_dir is not None else None
    fingerprint = dict(fingerprint or {}, stage=stage)

    # ---- data -----------------------------------------------------------------------------------
    sampler = GlobalBatchSampler(len(train_ds), batch_size, True, seed, info)
    worker_opts = (
        {"persistent_workers": opts.persistent_workers, "prefetch_factor": opts.prefetch_factor}
        if opts.num_workers
        else {}
    )
    train_loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=opts.num_workers,
                              pin_memory=opts.pin_memory, **worker_opts)  # fmt: skip
    validate = cfg.validation and val_ds is not None and len(val_ds) > 0
    val_loader = make_loader(val_ds, 512, False) if validate else None

    # ---- loss, optimiser, schedule, precision ---------------------------------------------------------
    targets = torch.as_tensor([int(y) for _, y in train_ds]) if cfg.class_weights == "balanced" else None
    weight = class_weight_tensor(cfg.class_weights, targets, num_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None,
                                  label_smoothing=cfg.label_smoothing)  # fmt: skip
    model.to(device)
    train_model = model
    if info.active:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=None if device == "cpu" else [device])
    groups = param_groups(model, cfg.weight_decay, cfg.quant_lr)
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = max(1, -(-sampler.num_batches() // cfg.grad_accum))
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if cfg.monitor == "loss" else "max", factor=cfg.plateau_factor,
            patience=cfg.plateau_patience)  # fmt: skip
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(
            cfg.schedule, total, round(cfg.warmup_epochs * steps_per_epoch), cfg.lr, cfg.end_lr, cfg.power,
            cfg.step_epochs * steps_per_epoch, cfg.gamma))  # fmt: skip
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if cfg.precision == "fp16" and device_type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (with a grad scaler); use bf16 on CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.precision == "fp16")

    # ---- guards, logging, state ----------------------------------------------------------------
    guards = Guards(cfg.guards)
    log = RunLogger(run_dir, stage, cfg.logging, enabled=info.main, resume=resume is not None)
    quantizers = _quantizers(model)
    qat = bool(quantizers) and cfg.quantize
    counters = {"epoch": 0, "skip": 0, "step": 0, "best_score": None, "best_epoch": -1, "best_metrics": {},
                "bad_epochs": 0, "prev_acc": None, "history": []}  # fmt: skip
    if resume is not None:
        counters = load_training_state(resume, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                       expect=fingerprint)  # fmt: skip
        guards.load_state_dict(counters.pop("guards"))
    result.history = counters["history"]

    def state_counters(epoch: int, skip: int) -> dict:
        return {**counters, "epoch": epoch, "skip": skip, "step": step, "guards": guards.state_dict()}

    def save(name: str, epoch: int, skip: int) -> Path | None:
        if ckpt_dir is None or not info.main:
            return None
        return save_training_state(ckpt_dir / f"{name}.safetensors", model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler, counters=state_counters(epoch, skip),
                                   fingerprint=fingerprint)  # fmt: skip

    def set_quant_phase(step: int) -> None:
        on = qat and step >= cfg.fake_quant_delay_steps
        for q in quantizers:
            q.set_fake_quant(on)
            if cfg.freeze_observers_after_steps is not None and step >= cfg.freeze_observers_after_steps:
                q.set_observer(False)

    def intervene(kind: str, detail: str, epoch: int, budget: bool = True, **values) -> None:
        row = guards.record(Intervention(step, epoch, kind, detail, **values), uses_budget=budget)
        result.interventions.append(row)
        log.intervention(row)

    step = counters["step"]
    epoch, skip = counters["epoch"], counters["skip"]
    last_good = {**_snapshot(model, optimizer, scheduler), "epoch": epoch, "skip": skip, "step": step}
    last_good_path = save("last", epoch, skip) if resume is None else Path(resume)
    best_snap = None
    if resume is None and val_loader is not None:  # where the stage starts: the reference for collapse
        set_quant_phase(step)
        m0 = evaluate(model, val_loader, num_classes, device)
        counters.update(best_score=list(score(m0, cfg.monitor)), best_epoch=0, best_metrics=m0,
                        prev_acc=100 * m0["accuracy"])  # fmt: skip
        row0 = {"epoch": 0, "step": step, "lr": optimizer.param_groups[0]["lr"], "val_accuracy": m0["accuracy"],
                "val_loss": m0["loss"], "val_macro_f1": m0["macro_f1"], "seconds": time.perf_counter() - start}  # fmt: skip
        result.history.append(row0)
        log.epoch(row0, model, cfg.logging.quantizer_stats)
        best_snap = last_good
        save("best", epoch, skip)
    best_file = ckpt_dir / "best.safetensors" if ckpt_dir is not None else None

    def restore_best() -> bool:
        if best_snap is not None:
            _restore(best_snap, model, optimizer, scheduler)
            return True
        if best_file is not None and best_file.exists():
            load_training_state(best_file, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
            return True
        return False

    def nonfinite_rollback(reason: str) -> None:
        """Back to the last good state with a lower LR, or stop with a message saying where to resume."""
        nonlocal epoch, skip, step
        if not guards.can_intervene:
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(
                f"{stage}: {reason} at step {step}, epoch {epoch + 1}, lr {lr:.3g} after "
                f"{guards.interventions_used} rollbacks; resume from {last_good_path} with a lower lr"
            )
        restore = lambda: _restore(last_good, model, optimizer, scheduler)  # noqa: E731
        before, after = _rollback(optimizer, scheduler, restore, cfg.guards.lr_factor)
        epoch, skip, step = last_good["epoch"], last_good["skip"], last_good["step"]
        intervene("nonfinite-rollback", f"{reason}; rolled back to step {step}", epoch, lr_before=before,
                  lr_after=after)  # fmt: skip

    clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    bar = _Bar(stage, total, progress and info.main)
    bar.progress_to(step)
    try:
        with _StopSignal() as stop:
            while epoch < cfg.epochs:
                if on_epoch_start is not None:
                    on_epoch_start(epoch, model)
                sampler.set_epoch(epoch, skip)
                train_model.train()
                loss_sum, norms, n, skipped, micro, rolled_back = 0.0, [], 0, 0, 0, False
                for x, y in train_loader:
                    set_quant_phase(step)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    ctx = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else nullcontext()
                    with ctx:
                        loss = loss_fn(train_model(x), y)
                    finite = not any_true(not bool(torch.isfinite(loss.detach())))
                    if finite:
                        scaler.scale(loss / cfg.grad_accum).backward()
                        loss_sum += float(loss.detach()) * len(y)
                        n += len(y)
                    micro += 1
                    if micro % cfg.grad_accum and finite:
                        continue
                    if finite:
                        scaler.unscale_(optimizer)
                        if cfg.grad_clip_value is not None:
                            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip_value)
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                        finite = math.isfinite(grad_norm) or cfg.precision == "fp16"
                    action = guards.on_step(finite)
                    if action == "ok":
                        scaler.step(optimizer)
                        scaler.update()
                        if cfg.schedule != "plateau":
                            scheduler.step()
                        step += 1
                        norms.append(grad_norm)
                        log.step(step, {"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                                        "grad_norm": grad_norm})  # fmt: skip
                        bar.advance(float(loss.detach()), optimizer.param_groups[0]["lr"])
                    optimizer.zero_grad(set_to_none=True)
                    if action == "skip":
                        skipped += 1
                        where = save(f"emergency-step{step}", epoch, sampler.skip + micro)
                        lr = optimizer.param_groups[0]["lr"]
                        intervene("nonfinite-skip", f"non-finite loss or gradient, step skipped; emergency "
                                  f"checkpoint {where}", epoch, budget=False, lr_before=lr, lr_after=lr)  # fmt: skip
                    elif action == "rollback":
                        nonfinite_rollback(f"{cfg.guards.nonfinite_skips} non-finite steps in a row")
                        rolled_back = True
                        break
                    if cfg.checkpoint.every_steps and action == "ok" and step % cfg.checkpoint.every_steps == 0:
                        save(f"step-{step:08d}", epoch, sampler.skip + micro)
                        _retain(ckpt_dir, cfg.checkpoint.keep)
                    if any_true(stop.flag):
                        where = save("last", epoch, sampler.skip + micro)
                        raise TrainingInterrupted(where, step)
                if rolled_back:
                    continue
                weights_ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
                if cfg.guards.enabled and any_true(not weights_ok):
                    nonfinite_rollback("non-finite weights at the end of the epoch")
                    continue

                # ---- end of epoch: validation, guards, schedule, checkpoints -----------------------
                row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": loss_sum / max(n, 1), "grad_norm_mean": sum(norms) / max(len(norms), 1),
                       "grad_norm_max": max(norms, default=0.0), "skipped_steps": skipped}  # fmt: skip
                improved = False
                if val_loader is not None:
                    m = evaluate(model, val_loader, num_classes, device)
                    row.update({"val_accuracy": m["accuracy"], "val_loss": m["loss"], "val_macro_f1": m["macro_f1"]})
                    acc = 100 * m["accuracy"]
                    best_acc = 100 * counters["best_metrics"]["accuracy"] if counters["best_metrics"] else None
                    why = guards.collapsed(acc, counters["prev_acc"], best_acc, len(val_ds))
                    s = score(m, cfg.monitor)
                    if why and (best_snap is not None or (best_file is not None and best_file.exists())):
                        if guards.can_intervene:
                            before, after = _rollback(optimizer, scheduler, restore_best, cfg.guards.lr_factor)
                            intervene("collapse-rollback", f"{why}; rolled back to epoch {counters['best_epoch']}",
                                      epoch + 1, lr_before=before, lr_after=after, metric_before=acc,
                                      metric_after=best_acc)  # fmt: skip
                            counters["prev_acc"] = best_acc
                        else:
                            result.gave_up = (f"{why}; gave up after {guards.interventions_used} interventions: "
                                              "lower the learning rate, raise the batch size, or add a stabilisation stage")  # fmt: skip
                            intervene("gave-up", result.gave_up, epoch + 1, budget=False, metric_before=acc)
                    else:
                        counters["prev_acc"] = acc
                        best = counters["best_score"]
                        min_delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
                        if best is None or s[0] > best[0] + min_delta or (s[0] == best[0] and s[1] > best[1]):
                            counters.update(best_score=list(s), best_epoch=epoch + 1, best_metrics=m, bad_epochs=0)
                            improved = True
                        else:
                            counters["bad_epochs"] += 1
                    if cfg.schedule == "plateau":
                        scheduler.step(m["loss"] if cfg.monitor == "loss" else m[cfg.monitor])
                    bar.note(f"val acc {m['accuracy']:.3f}")
                row["seconds"] = time.perf_counter() - start
                result.history.append(row)
                log.epoch(row, model, cfg.logging.quantizer_stats)
                epoch, skip = epoch + 1, 0
                last_good = {**_snapshot(model, optimizer, scheduler), "epoch": epoch, "skip": 0, "step": step}
                if improved:
                    best_snap = last_good
                    save("best", epoch, 0)
                last_good_path = save("last", epoch, 0) or last_good_path
                if result.gave_up:
                    break
                stop_early = cfg.early_stopping and val_loader is not None
                if stop_early and counters["bad_epochs"] >= cfg.early_stopping.patience:
                    result.stopped_early = True
                    break
    finally:
        bar.close()
        log.close()
    if best_snap is not None:
        model.load_state_dict(best_snap["model"])
    elif best_file is not None and best_file.exists() and counters["best_epoch"] >= 0:
        load_training_state(best_file, model=model, restore_rng=False)
    for q in quantizers:  # leave the model as a quantized model whatever the stage did
        q.set_fake_quant(True)
    result.best_epoch = counters["best_epoch"] if counters["best_epoch"] >= 0 else len(result.history)
    result.best_metrics = counters["best_metrics"]
    result.steps = step
    result.seconds = time.perf_counter() - start
    return result


def _retain(ckpt_dir: Path | None, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints."""
    if ckpt_dir is None:
        return
    for old in sorted(ckpt_dir.glob("step-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)


class _Bar:
    """A rich progress bar with ETA, loss, LR and the last validation result; silent when disabled."""

    def __init__(self, desc: str, total: int, enabled: bool):
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
        self.task = self.progress.add_task(desc, total=total, info="")

    def progress_to(self, step: int) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step)

    def advance(self, loss: float, lr: float) -> None:
        if self.progress:
            self.progress.update(self.task, advance=1, info=f"loss {loss:.4f} lr {lr:.2e} {self.last}")

    def note(self, text: str) -> None:
        self.last = text

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
