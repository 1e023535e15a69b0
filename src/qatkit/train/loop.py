"""The training loop: one call of :func:`fit` trains one stage (float or QAT), top to bottom.

``_Trainer.run``: baseline validation -> for each epoch: ``train_epoch`` (autocast, backward, accumulation
windows, clipping, non-finite guard, optimiser step, step checkpoints, signals) -> ``end_epoch`` (validation,
collapse guard, plateau, early stopping, last/best checkpoints) -> restore the best weights. Checkpoints hold
everything needed to continue exactly, mid-epoch included: a resume also takes the run's ``best`` and ``last``
back as best and rollback states, redoes a baseline it had not finished, and drops log rows written after it.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qatkit.components.splits import targets_of
from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.tasks import ClassificationTask, Objective, Task, predict
from qatkit.train import fsdp
from qatkit.train.compiled import CompiledModel
from qatkit.train.config import TrainConfig
from qatkit.train.distill import Teacher, with_teacher
from qatkit.train.distributed import DistInfo, GlobalBatchSampler, any_true, current, from_main
from qatkit.train.guards import Guards, Intervention, TrainingDiverged
from qatkit.train.helpers import (
    ProgressBar,
    StopSignal,
    make_loader,
    param_groups,
    restore,
    retain,
    scale_lr,
    score,
    snapshot,
)
from qatkit.train.logger import RunLogger
from qatkit.train.schedules import lr_multiplier
from qatkit.train.state import load_training_state, read_counters, save_training_state

__all__ = ["FitResult", "LoaderOptions", "TrainingInterrupted", "fit", "make_loader", "param_groups", "predict",
           "score"]  # fmt: skip


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved and the run can resume from it."""

    def __init__(self, checkpoint: Path | None, step: int):
        where = f"; resume with --resume auto (checkpoint {checkpoint})" if checkpoint else ""
        super().__init__(f"interrupted at step {step}{where}")


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
    compile: dict | None = None
    """What ``compile: true`` did (train/compiled.py ``CompileInfo``), None without it."""

    def summary(self) -> dict:
        """What the run report shows for a stage (also kept in progress.json for resumed runs)."""
        return {"epochs": sum(h["epoch"] > 0 for h in self.history), "best_epoch": self.best_epoch,
                "seconds": self.seconds, "steps": self.steps, "gave_up": self.gave_up,
                "interventions": self.interventions, "compile": self.compile}  # fmt: skip


def fit(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    *,
    num_classes: int | None = None,
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
    task: Task | None = None,
    objective: Objective | None = None,
    teacher: Teacher | nn.Module | None = None,
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs``; keep the weights of the best validation epoch.

    With ``run_dir``: ``<stage>_train.csv``, TensorBoard scalars and training-state checkpoints under
    ``run_dir/checkpoints/<stage>/``; ``resume`` continues from such a checkpoint exactly (same weights as an
    uninterrupted run on CPU). ``on_epoch_start(epoch, model)`` is a test hook (e.g. to inject a fault).
    ``task`` says what is learned (default: classification into ``num_classes``); ``objective`` replaces it
    with any loss/evaluate pair (the LM distillation task). ``teacher``: the model a ``cfg.distill`` stage learns
    from (train/distill.py).
    """
    if cfg.epochs == 0:
        return FitResult()
    if objective is None:
        if task is None:
            if num_classes is None:
                raise ValueError("fit needs num_classes (classification), a task or an objective")
            task = ClassificationTask(num_classes)
        objective = task.objective(cfg, targets_of(train_ds) if cfg.class_weights == "balanced" else None)
    if cfg.distill is not None:
        if teacher is None:
            raise ValueError("distill: this stage has no teacher (the float model distils into QAT stages only)")
        objective, train_ds = with_teacher(objective, train_ds, cfg.distill, teacher, device)
    trainer = _Trainer(model, train_ds, val_ds, cfg, objective, batch_size, seed, loader or LoaderOptions(),
                       run_dir, stage, resume, fingerprint or {}, device, progress, on_epoch_start)  # fmt: skip
    return trainer.run()


class _Trainer:
    """The state of one stage's training and the steps that change it."""

    def __init__(self, model, train_ds, val_ds, cfg: TrainConfig, task: Objective, batch_size, seed, opts, run_dir,
                 stage, resume, fingerprint, device, progress, on_epoch_start):  # fmt: skip
        self.start = time.perf_counter()
        self.model, self.cfg, self.task, self.device, self.stage = model, cfg, task, device, stage
        self.progress = progress
        self.info: DistInfo = current()
        self.on_epoch_start = on_epoch_start
        self.ckpt_dir = Path(run_dir) / "checkpoints" / stage if run_dir is not None else None
        self.fingerprint = dict(fingerprint, stage=stage)
        self.result = FitResult()
        self.seed = seed
        self.parts = getattr(task, "train_fields", ())  # loss parts an objective reports (distillation)

        # data: the same global batches on every rank, in an order set by (seed, epoch) only
        self.sampler = GlobalBatchSampler(len(train_ds), batch_size, seed, self.info)
        workers = {"persistent_workers": opts.persistent_workers, "prefetch_factor": opts.prefetch_factor}
        self.train_loader = DataLoader(train_ds, batch_sampler=self.sampler, num_workers=opts.num_workers,
                                       pin_memory=opts.pin_memory, generator=torch.Generator().manual_seed(seed),
                                       **(workers if opts.num_workers else {}))  # fmt: skip
        self.val_ds = val_ds if cfg.validation and val_ds is not None and len(val_ds) else None
        self.val_loader = make_loader(self.val_ds, task.val_batch_size, False) if self.val_ds is not None else None

        # optimiser, schedule, precision
        model.to(device)
        self.sharded = self.info.active and cfg.parallel == "fsdp"
        if self.sharded:  # parameters, gradients and optimizer state of the trainable modules split over ranks
            fsdp.shard(model, device)
        # compile: true steps through torch.compile (inside DDP, whose own Python would split the graph);
        # checkpoints, validation and export keep using the model itself
        self.compiled = None
        if cfg.compile:
            self.compiled = CompiledModel(model, cfg.compile_mode, on_fallback=lambda m: self.log.notice(m))
        self.train_model = self.compiled or model
        if self.info.active and not self.sharded:
            ids = None if device == "cpu" else [device]
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)
        groups = param_groups(model, cfg.weight_decay, cfg.quant_lr)
        self.params = [p for g in groups for p in g["params"]]
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.batches = self.sampler.num_batches()
        steps_per_epoch = max(1, -(-self.batches // cfg.grad_accum))
        self.total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        if cfg.schedule == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min" if task.lower_is_better(task.monitor) else "max", factor=cfg.plateau_factor,
                patience=cfg.plateau_patience)  # fmt: skip
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(
                cfg.schedule, self.total, round(cfg.warmup_epochs * steps_per_epoch), cfg.lr, cfg.end_lr, cfg.power,
                cfg.step_epochs * steps_per_epoch, cfg.gamma))  # fmt: skip
        self.device_type = "cuda" if str(device).startswith("cuda") else "cpu"
        if cfg.precision == "fp16" and self.device_type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (with a grad scaler); use bf16 on CPU")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=cfg.precision == "fp16")
        self.clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf

        # guards, logging, counters (everything below is saved in checkpoints)
        self.guards = Guards(cfg.guards)
        self.quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
        self.qat = bool(self.quantizers) and cfg.quantize
        self._phase: tuple[bool, bool] | None = None
        self.c = {"epoch": 0, "skip": 0, "step": 0, "best_score": None, "best_epoch": -1, "best_metrics": {},
                  "bad_epochs": 0, "prev_acc": None, "history": [], "finished": None, "lr": cfg.lr,
                  "stats": self.fresh_stats()}  # fmt: skip
        self.best_snap: dict | None = None
        self.last_good: dict | None = None
        self.last_good_path: Path | None = None
        if resume is not None:
            self.load(Path(resume))
        self.log = self.open_log(run_dir, resume is not None)
        self.result.history = self.c["history"]
        self.result.interventions = list(self.guards.log)
        if self.last_good is None:
            self.last_good = self.snapshot()
            self.last_good_path = Path(resume) if resume is not None else self.save("last")
            if "path" in self.last_good and resume is not None:  # on disk: the state resumed from
                self.last_good["path"] = Path(resume)

    # ---- state ------------------------------------------------------------------------------------
    def fresh_stats(self) -> dict:
        parts = {f"{k}_sum": 0.0 for k in self.parts}
        return {"loss_sum": 0.0, "n": 0, "norm_sum": 0.0, "norm_max": 0.0, "steps": 0, "skipped": 0, **parts}

    def snapshot(self, name: str = "last") -> dict:
        """The position and the state: copied in memory, or (``checkpoint.in_memory: false``) the checkpoint
        ``name`` that holds it on disk."""
        pos = {"epoch": self.c["epoch"], "skip": self.c["skip"], "step": self.c["step"], "stats": dict(self.c["stats"])}
        if self.on_disk:
            return {**pos, "path": self.ckpt_dir / f"{name}.safetensors"}
        return snapshot(self.model, self.optimizer, self.scheduler, **pos)

    @property
    def on_disk(self) -> bool:
        return not self.cfg.checkpoint.in_memory and self.ckpt_dir is not None and self.info.world == 1

    def save(self, name: str) -> Path | None:
        if self.ckpt_dir is None:
            return None
        full = None
        if self.sharded:  # every rank takes part in gathering the full state; rank 0 writes it
            full = fsdp.full_model_state(self.model), fsdp.full_optimizer_state(self.model, self.optimizer)
        if not self.info.main:
            return None
        counters = dict(self.c, guards=self.guards.state_dict())
        return save_training_state(self.ckpt_dir / f"{name}.safetensors", model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, scaler=self.scaler, counters=counters,
                                   fingerprint=self.fingerprint, trainable_only=self.cfg.checkpoint.trainable_only,
                                   full_states=full)  # fmt: skip

    def load(self, path: Path) -> None:
        """Continue from ``path``, with the run's ``best`` and ``last`` beside it as best and rollback states."""
        at = read_counters(path, self.limits(), complete=True)
        best, last = path.parent / "best.safetensors", path.parent / "last.safetensors"
        if best.is_file() and read_counters(best).get("best_epoch") == at["best_epoch"] <= at["epoch"]:
            self.best_snap = self.load_file(best, rng=False, name="best")
        if last.is_file() and last.resolve() != path.resolve() and self.not_after(read_counters(last), at):
            self.last_good, self.last_good_path = self.load_file(last, rng=False), last
        self.load_file(path, rng=True)
        if at["lr"] != self.cfg.lr:  # the recipe's LR was changed for the resume: continue at the new one
            scale_lr(self.optimizer, self.scheduler, self.cfg.lr / at["lr"])
            self.c["lr"] = self.cfg.lr

    def open_log(self, run_dir, resumed: bool) -> RunLogger:
        """The stage's logs; on resume, what the interrupted run logged after the checkpoint is dropped."""
        fields = [*(f"train_{k}" for k in self.parts), *self.task.val_fields]
        log = RunLogger(run_dir, self.stage, self.cfg.logging, enabled=self.info.main, resume=resumed,
                        val_fields=fields, purge_step=self.c["step"] + 1 if resumed else None)  # fmt: skip
        if resumed:
            log.rewind(len(self.c["history"]), self.c["step"])
        return log

    def limits(self) -> dict[str, int]:
        return {"epoch": self.cfg.epochs, "skip": self.batches}

    @staticmethod
    def not_after(a: dict, b: dict) -> bool:
        """Whether position ``a`` (counters) is at or before position ``b`` in the same run."""
        return a["step"] <= b["step"] and a["epoch"] <= b["epoch"]

    def load_file(self, path: Path, rng: bool, name: str = "last") -> dict:
        """Load a training-state file into the live objects and counters; returns its snapshot (on disk: the
        checkpoint ``name``)."""
        counters = load_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                       scaler=self.scaler, expect={"stage": self.stage}, restore_rng=rng,
                                       limits=self.limits(), complete=True, sharded=self.sharded)  # fmt: skip
        self.guards.load_state_dict(counters.pop("guards"))
        self.c.update(counters)
        self._phase = None
        return self.snapshot(name)

    def set_quant_phase(self) -> None:
        """Fake quantization on after the delay, observers frozen after N steps; touches buffers only on change."""
        on = self.qat and self.c["step"] >= self.cfg.fake_quant_delay_steps
        freeze = self.cfg.freeze_observers_after_steps
        frozen = freeze is not None and self.c["step"] >= freeze
        if (on, frozen) == self._phase:
            return
        self._phase = (on, frozen)
        for q in self.quantizers:
            q.set_fake_quant(on)
            if frozen:
                q.set_observer(False)

    def intervene(self, kind: str, detail: str, budget: bool = True, **values) -> None:
        event = Intervention(self.c["step"], self.c["epoch"] + 1, kind, detail, **values)
        row = self.guards.record(event, uses_budget=budget)
        self.result.interventions.append(row)
        self.log.intervention(row)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> FitResult:
        self.bar = ProgressBar(self.stage, self.total, self.progress and self.info.main, done=self.c["step"])
        try:
            with StopSignal() as self.stop:
                if self.val_loader is not None and not self.c["history"]:
                    self.baseline()  # also on a resume from the checkpoint written before it
                while self.c["epoch"] < self.cfg.epochs and not self.c["finished"] and not self.out_of_steps():
                    if self.on_epoch_start is not None:
                        self.on_epoch_start(self.c["epoch"], self.model)
                    if self.train_epoch():
                        continue  # rolled back: the epoch loop restarts from the restored position
                    self.end_epoch()
        finally:
            self.bar.close()
            self.log.close()
        return self.finish()

    def out_of_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.c["step"] >= self.cfg.max_steps

    def validate(self) -> dict:
        return from_main(self.task.evaluate(self.model, self.val_loader, self.device))

    @staticmethod
    def val_row(m: dict) -> dict:
        return {f"val_{k}": v for k, v in m.items() if isinstance(v, (int, float))}

    def baseline(self) -> None:
        """Validate before training: the reference for collapse, and a candidate for the best weights."""
        self.set_quant_phase()
        m = self.validate()
        t = self.task
        self.c.update(best_score=list(score(m, t.monitor, t.lower_is_better(t.monitor))), best_epoch=0, best_metrics=m,
                      prev_acc=t.collapse_points(m))  # fmt: skip
        row = {"epoch": 0, "step": 0, "lr": self.lr(), **self.val_row(m), "seconds": time.perf_counter() - self.start}
        self.c["history"].append(row)
        self.log.epoch(row, self.model, self.cfg.logging.quantizer_stats)
        self.best_snap = self.snapshot("best")
        self.save("best")

    def train_epoch(self) -> bool:
        """One epoch of steps from the saved position; True if a rollback moved the position instead."""
        cfg, c = self.cfg, self.c
        first = c["skip"]
        self.sampler.set_epoch(c["epoch"], first)
        self.train_loader.generator.manual_seed(self.seed * 100_003 + c["epoch"])  # worker seeds: (seed, epoch)
        self.train_model.train()
        pending = 0
        for i, batch in enumerate(self.train_loader):
            b = first + i  # batch number within the epoch
            self.set_quant_phase()
            with torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
                loss, n = self.task.loss(self.train_model, batch, self.device)
            finite = not any_true(not bool(torch.isfinite(loss.detach())))
            if finite:
                self.scaler.scale(loss / cfg.grad_accum).backward()
                c["stats"]["loss_sum"] += float(loss.detach()) * n
                c["stats"]["n"] += n
                for k in self.parts:
                    c["stats"][f"{k}_sum"] += float(self.task.parts[k]) * n
                pending += 1
                window_done = (b + 1) % cfg.grad_accum == 0 or b + 1 == self.batches
                if not window_done:
                    continue
            if self.step(finite, pending, float(loss.detach())):
                return True
            pending = 0
            c["skip"] = b + 1
            if cfg.checkpoint.every_steps and finite and c["step"] % cfg.checkpoint.every_steps == 0:
                self.save(f"step-{c['step']:08d}")
                retain(self.ckpt_dir, cfg.checkpoint.keep)
            self.check_stop(f"step-{c['step']:08d}")  # not "last": that stays the rollback state
            if self.out_of_steps():
                break
        return False

    def step(self, finite: bool, pending: int, loss: float) -> bool:
        """Finish an accumulation window: clip, guard, optimiser step. True if the guard rolled back."""
        cfg, c = self.cfg, self.c
        grad_norm = float("nan")
        if finite:
            self.scaler.unscale_(self.optimizer)
            if pending < cfg.grad_accum:  # a short last window: average over the micro-batches it had
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(cfg.grad_accum / pending)
            if cfg.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(self.params, cfg.grad_clip_value)
            grad_norm = fsdp.local_float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
            finite = math.isfinite(grad_norm) or cfg.precision == "fp16"
        action = self.guards.on_step(finite)
        if action == "ok":
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if cfg.schedule != "plateau":
                self.scheduler.step()
            c["step"] += 1
            s = c["stats"]
            s["norm_sum"], s["norm_max"], s["steps"] = (
                s["norm_sum"] + grad_norm,
                max(s["norm_max"], grad_norm),
                s["steps"] + 1,
            )
            self.log.step(c["step"], {"loss": loss, "lr": self.lr(), "grad_norm": grad_norm})
            self.bar.advance(loss, self.lr())
        self.optimizer.zero_grad(set_to_none=True)
        if action == "skip":
            c["stats"]["skipped"] += 1
            where = self.save(f"emergency-step{c['step']:08d}-{c['stats']['skipped']}")
            self.intervene("nonfinite-skip", f"non-finite loss or gradient, step skipped; emergency checkpoint {where}",
                           budget=False, lr_before=self.lr(), lr_after=self.lr())  # fmt: skip
        elif action == "rollback":
            self.rollback_nonfinite(f"{cfg.guards.nonfinite_skips} non-finite steps in a row")
            return True
        return False

    def rollback_nonfinite(self, reason: str) -> None:
        """Back to the last good state with a lower LR, or stop with a message saying where to resume."""
        c = self.c
        if not self.guards.can_intervene:
            raise TrainingDiverged(
                f"{self.stage}: {reason} at step {c['step']}, epoch {c['epoch'] + 1}, lr {self.lr():.3g} after "
                f"{self.guards.interventions_used} rollbacks; resume from {self.last_good_path} with a lower lr "
                "(change lr in the recipe and run with --resume auto)"
            )
        before = self.lr()
        bases, lrs = list(getattr(self.scheduler, "base_lrs", [])), [g["lr"] for g in self.optimizer.param_groups]
        detected = c["step"]
        self.restore(self.last_good)
        scale_lr(self.optimizer, self.scheduler, self.cfg.guards.lr_factor, bases or None, lrs)
        self.intervene("nonfinite-rollback", f"{reason} (step {detected}); rolled back to step "
                       f"{self.last_good['step']}", lr_before=before, lr_after=self.lr())  # fmt: skip
        c.update(epoch=self.last_good["epoch"], skip=self.last_good["skip"], step=self.last_good["step"],
                 stats=dict(self.last_good["stats"]))  # fmt: skip
        retain(self.ckpt_dir, self.cfg.checkpoint.keep, newer_than=c["step"])

    def restore(self, snap: dict) -> None:
        """Back to a snapshot's model, optimizer and scheduler (the counters and guards stay the caller's); the
        next step applies the quantizer phase afresh (as a resume does)."""
        if "path" in snap:
            counters, guards = dict(self.c), copy.deepcopy(self.guards.state_dict())  # the same history list
            self.load_file(snap["path"], rng=False)
            self.c.clear()
            self.c.update(counters)
            self.guards.load_state_dict(guards)
        else:
            restore(snap, self.model, self.optimizer, self.scheduler)
        self._phase = None

    def restore_best(self) -> None:
        self.restore(self.best_snap)

    def has_best(self) -> bool:
        return self.best_snap is not None

    def end_epoch(self) -> None:
        """Validation, collapse guard, plateau, early stopping, checkpoints, logs."""
        cfg, c, s = self.cfg, self.c, self.c["stats"]
        if self.guards.cfg.enabled and any_true(
            not all(bool(torch.isfinite(fsdp.local(p)).all()) for p in self.model.parameters())
        ):
            self.rollback_nonfinite("non-finite weights at the end of the epoch")
            return
        row = {"epoch": c["epoch"] + 1, "step": c["step"], "lr": self.lr(), "train_loss": s["loss_sum"] / max(s["n"], 1),
               "grad_norm_mean": s["norm_sum"] / max(s["steps"], 1), "grad_norm_max": s["norm_max"],
               "skipped_steps": s["skipped"]}  # fmt: skip
        row.update({f"train_{k}": s[f"{k}_sum"] / max(s["n"], 1) for k in self.parts})
        improved = False
        if self.val_loader is not None:
            m = self.validate()
            row.update(self.val_row(m))
            improved = self.judge(m)
        row["seconds"] = time.perf_counter() - self.start
        c["history"].append(row)
        self.log.epoch(row, self.model, cfg.logging.quantizer_stats)
        c.update(epoch=c["epoch"] + 1, skip=0, stats=self.fresh_stats())
        stop_early = cfg.early_stopping and self.val_loader is not None
        if stop_early and c["bad_epochs"] >= cfg.early_stopping.patience and not c["finished"]:
            c["finished"] = "early-stop"
            self.result.stopped_early = True
        self.last_good = self.snapshot()
        if improved:
            self.best_snap = self.snapshot("best") if self.on_disk else self.last_good
            self.save("best")
        self.last_good_path = self.save("last") or self.last_good_path
        self.check_stop(None)

    def judge(self, m: dict) -> bool:
        """Apply the collapse guard, the plateau schedule and best tracking to one validation result."""
        cfg, c = self.cfg, self.c
        monitor = self.task.monitor
        self.bar.note(f"val {monitor} {m[monitor]:.4f}")
        acc = self.task.collapse_points(m)
        if acc is None:  # the collapse guard watches share metrics (accuracy, F1, AUC); the other guards stay on
            return self.track_best(m)
        best_acc = self.task.collapse_points(c["best_metrics"]) if c["best_metrics"] else None
        why = self.guards.collapsed(acc, c["prev_acc"], best_acc, len(self.val_ds), self.task.monitor)
        if why and self.has_best():
            if self.guards.can_intervene:
                before, bases = self.lr(), list(getattr(self.scheduler, "base_lrs", []))
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                self.restore_best()
                scale_lr(self.optimizer, self.scheduler, cfg.guards.lr_factor, bases or None, lrs)
                self.intervene("collapse-rollback", f"{why}; rolled back to epoch {c['best_epoch']}",
                               lr_before=before, lr_after=self.lr(), metric_before=acc, metric_after=best_acc)  # fmt: skip
                c["prev_acc"] = best_acc
            else:
                self.result.gave_up = (f"{why}; gave up after {self.guards.interventions_used} interventions: lower the "
                                       "learning rate, raise the batch size, or add a stabilisation stage")  # fmt: skip
                c["finished"] = "gave-up"
                self.intervene("gave-up", self.result.gave_up, budget=False, metric_before=acc)
            return False
        c["prev_acc"] = acc
        return self.track_best(m)

    def track_best(self, m: dict) -> bool:
        """Plateau schedule and best-epoch tracking; True when this validation is the best so far."""
        cfg, c = self.cfg, self.c
        if cfg.schedule == "plateau":
            self.scheduler.step(m[self.task.monitor])
        s, best = score(m, self.task.monitor, self.task.lower_is_better(self.task.monitor)), c["best_score"]
        min_delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
        if best is None or s[0] > best[0] + min_delta or (s[0] == best[0] and s[1] > best[1]):
            c.update(best_score=list(s), best_epoch=c["epoch"] + 1, best_metrics=m, bad_epochs=0)
            return True
        c["bad_epochs"] += 1
        return False

    def check_stop(self, name: str | None) -> None:
        """On SIGINT/SIGTERM save the position as ``name`` (None: the ``last`` just saved) and stop."""
        if any_true(self.stop.flag):
            raise TrainingInterrupted(self.save(name) if name else self.last_good_path, self.c["step"])

    def finish(self) -> FitResult:
        c, r = self.c, self.result
        if self.best_snap is not None:
            if "path" in self.best_snap:
                self.restore(self.best_snap)
            else:
                self.model.load_state_dict(self.best_snap["model"])
        for q in self.quantizers:  # leave the model as a quantized model whatever the stage did
            q.set_fake_quant(True)
        r.gave_up = r.gave_up or (self.guards.log[-1]["detail"] if c["finished"] == "gave-up" else None)
        r.stopped_early = c["finished"] == "early-stop"
        r.best_epoch = c["best_epoch"] if c["best_epoch"] >= 0 else len(r.history)
        r.best_metrics, r.steps = c["best_metrics"], c["step"]
        r.seconds = time.perf_counter() - self.start
        r.compile = self.compiled.info.to_dict() if self.compiled is not None else None
        return r
