"""Training-stage configuration (a recipe section): optimiser, schedule, guards, checkpoints, logging."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from qatkit.base.config import UNION_TAGS, Name, Strict, one_of

ClassWeights = Annotated[list[Annotated[float, Field(ge=0, le=1e6)]], Field(min_length=2, max_length=100_000)]
"""One non-negative weight per class."""


class EarlyStopping(Strict):
    patience: int = Field(10, ge=1, le=100_000)
    min_delta: float = Field(0.0, ge=0.0)


class GuardConfig(Strict):
    """Automatic recovery from divergence (seed 002) and accuracy collapse (seed 000)."""

    enabled: bool = True
    nonfinite_skips: int = Field(3, ge=1, le=1000)
    """Consecutive non-finite steps skipped before rolling back to the last good checkpoint."""
    collapse_drop: float = Field(5.0, gt=0)
    """Validation metric drop in one epoch (points, i.e. percent for accuracy) that counts as a collapse."""
    collapse_below_best: float = Field(10.0, gt=0)
    """Distance below the best epoch so far (points) that counts as a collapse."""
    noise_sigmas: float = Field(3.0, ge=0)
    """A drop must also exceed this many standard errors of the validation accuracy (sqrt(p(1-p)/n)), so a
    one-sample wobble on a small validation set is not taken for a collapse."""
    lr_factor: float = Field(0.5, gt=0, lt=1)
    max_interventions: int = Field(3, ge=0, le=100)


class CheckpointConfig(Strict):
    """Training-state checkpoints: ``last`` and ``best`` every epoch, plus every N optimiser steps."""

    every_steps: int = Field(0, ge=0, le=10**9)
    keep: int = Field(3, ge=1, le=1000)
    in_memory: bool = True
    """Also hold the last-good and best states (model and optimizer) in memory; False: only on disk, read back
    when a guard rolls back or the stage ends (for models whose two extra copies would not fit in memory; a
    single-process run that writes checkpoints)."""
    trainable_only: bool = False
    """Training states hold the parameters that train and every buffer, not the frozen ones (an LM's
    embeddings, norms and head): those are rebuilt the same way before a resume, so the files stay small."""


class LoggingConfig(Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "qatkit"
    quantizer_stats: bool = True
    step_csv: bool = Field(False, description="also write <stage>_steps.csv: loss, lr, grad norm every step")


class DistillConfig(Strict):
    """Knowledge distillation from the float model (QAT stages): loss = (1 - weight) * task + weight * distill."""

    weight: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0, le=100)
    """Softens both models' logits (classification, binary); the KL is scaled by T² (Hinton). Unused for
    regression, whose distillation loss is the MSE between the two models' outputs."""
    cache: Literal["auto"] | bool = "auto"
    """Teacher outputs computed once over the train split (true), every step (false), or cached when they
    fit in 256 MB (auto). Caching assumes the train split yields the same inputs every epoch (no augmentation)."""


class TrainConfig(Strict):
    """One training stage: optimiser, schedule, regularisation, stopping, guards, checkpoints, logging."""

    name: Name | None = None
    epochs: int = Field(20, ge=0, le=100_000)
    max_steps: Optional[int] = Field(
        None, ge=1, le=10**9, description="stop after this many optimiser steps (None: epochs)"
    )
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: str = "constant"
    warmup_epochs: float = Field(0.0, ge=0, le=100_000)
    end_lr: float = Field(0.0, ge=0)
    power: float = Field(1.0, gt=0)
    step_epochs: int = Field(10, ge=1, le=100_000)
    gamma: float = Field(0.1, gt=0, le=1)
    plateau_patience: int = Field(10, ge=1, le=100_000)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    grad_clip_value: float | None = Field(None, gt=0)
    grad_accum: int = Field(1, ge=1, le=4096)
    batch_size: int | None = Field(None, ge=1, le=65536)
    """This stage's batch size instead of ``data.batch_size`` (e.g. smaller batches, so more steps, for a
    low-bit QAT fine-tune of a float model trained with large ones)."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["balanced"] | ClassWeights | None = None
    monitor: str | None = None
    """The validation metric that picks the best epoch and drives early stopping, the plateau schedule and the
    collapse guard; any metric of the task (default: accuracy for classes, loss for regression)."""
    early_stopping: EarlyStopping | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    validation: bool = True
    quantize: bool = True
    weight_bits: int | None = Field(None, ge=2, le=8)
    """Progressive bit-lowering: this stage quantizes every quantized layer's weights at this width instead of
    the rules' own (e.g. stages at 8 and 4 bits before a last stage at the rules' 2 bits); the scales are
    re-initialised by MSE search at each change of width."""
    fake_quant_delay_steps: int = Field(0, ge=0, le=10**9)
    freeze_observers_after_steps: int | None = Field(None, ge=0, le=10**9)
    quant_lr: float | None = Field(None, gt=0)
    compile: bool = False
    """Train through ``torch.compile`` (inductor): the quantizers trace with no graph break; the stage summary gives
    the first call's seconds and the graphs made; where compiling fails the stage says why and trains eagerly."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: replicate the model on every rank (``ddp``), or shard the modules that hold trainable
    parameters with FSDP2 (``fsdp``: their weights, gradients and optimizer state take 1/N per rank)."""
    guards: GuardConfig = Field(default_factory=GuardConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distill: DistillConfig | None = None
    """Distil the float model into this (QAT) stage; None: the task loss alone."""

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        from qatkit.train.schedules import SCHEDULES

        return one_of(v, list(SCHEDULES) + ["plateau"], "schedule")

    @model_validator(mode="after")
    def _plateau_needs_validation(self) -> TrainConfig:
        if self.schedule == "plateau" and not self.validation:
            raise ValueError("schedule 'plateau' needs validation: true")
        return self


STAGE_TAGS = ("one-stage", "stages")
UNION_TAGS.update(STAGE_TAGS)
"""Union tags of :data:`Stages`; error messages leave them out of field paths."""

Stages = Annotated[
    Union[
        Annotated[TrainConfig, Tag("one-stage")],
        Annotated[Annotated[list[TrainConfig], Field(min_length=1, max_length=64)], Tag("stages")],
    ],  # noqa: UP007
    Discriminator(lambda v: "stages" if isinstance(v, list) else "one-stage"),
]
"""One training stage, or a list of stages run one after another."""


def as_stages(cfgs: TrainConfig | list[TrainConfig] | None) -> list[TrainConfig]:
    """A :data:`Stages` value as a list (one stage: a list of one; None: no stages)."""
    return list(cfgs) if isinstance(cfgs, list) else [cfgs] if cfgs is not None else []
