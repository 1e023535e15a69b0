"""The recipe: one validated document that says what ``qatkit run`` does, stage by stage. Unknown keys and bad
values fail with the field's place and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from qatkit.base.config import FilePath, Name, Strict, one_of
from qatkit.export.config import ExportConfig
from qatkit.recipe.checks import Criteria, CVConfig, MixedPrecision
from qatkit.train.config import Stages, TrainConfig, as_stages
from qatkit.transform.rules import QuantRecipe


class TaskConfig(Strict):
    """What the model learns: ``classification`` (C logits), ``binary`` (one logit + sigmoid, or two logits) or
    ``regression``; a string is short for ``{name: ...}``."""

    name: str = "classification"
    threshold: float = Field(0.5, gt=0, lt=1)
    """binary: the probability at or above which a prediction is positive."""

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from qatkit.tasks import TASKS

        return one_of(v, TASKS, "task")


TABLE_SUFFIXES = (".csv", ".parquet")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


class DataConfig(Strict):
    """Where the data comes from: a bundled set (``name``), a file (``path``: .npz, .csv, .parquet) or the user's
    own loader (``target``: "module:callable" returning train/val/test data sets, called with ``args``)."""

    name: str | None = None
    path: FilePath | None = None
    target: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    """Tables: the target column."""
    features: list[str] | None = Field(None, min_length=1, max_length=1_000_000)
    """Tables: the feature columns (default: every column but the label, groups and split)."""
    groups: str | None = None
    """Tables: a column of group ids (subjects, signers); splits then keep each group in one split."""
    batch_size: int = Field(64, ge=1, le=65536)
    val_fraction: float = Field(0.15, ge=0.0, lt=0.9)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    """When the data has no test split: the share of rows (or groups) held out for test."""
    num_workers: int = Field(0, ge=0, le=256)
    persistent_workers: bool = False
    prefetch_factor: int | None = Field(None, ge=1, le=256)
    pin_memory: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        from qatkit.components.datasets import DATASETS

        if v is not None and ("/" in v or "." in v or ":" in v):
            raise ValueError(f"{v!r} is not a bundled data set: for a file write `path: {v!r}`, for a loader `target:`")
        return None if v is None else one_of(v, DATASETS, "dataset")

    @field_validator("target")
    @classmethod
    def _target(cls, v: str | None) -> str | None:
        return None if v is None else check_target(v)

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        given = [k for k in ("name", "path", "target") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of name, path, target (got {', '.join(given)})")
        if not given:
            self.name = "digits"
        table = self.path is not None and self.path.suffix.lower() in TABLE_SUFFIXES
        for k in ("label", "features", "groups"):
            if getattr(self, k) is not None and not table:
                raise ValueError(f"{k} is for table files (path: *.csv or *.parquet)")
        if table and self.label is None:
            raise ValueError(f"a table file needs `label:` (the target column of {self.path.name})")
        if self.args and self.target is None:
            raise ValueError("args are for a data target")
        return self


class ModelConfig(Strict):
    """The model: a bundled one (``name``), the user's own (``target``: "module:callable", called with ``args``
    as keyword arguments), or a Hugging Face ``save_pretrained`` folder (``hf``; offline, no remote code)."""

    name: str | None = None
    target: str | None = None
    hf: FilePath | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        from qatkit.components.models import MODELS

        if v is not None and ":" in v:
            raise ValueError(f"{v!r} is an import path: write it as `target: {v!r}` (name is for bundled models)")
        return None if v is None else one_of(v, MODELS, "model")

    @field_validator("target")
    @classmethod
    def _target(cls, v: str | None) -> str | None:
        return None if v is None else check_target(v)

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        given = [k for k in ("name", "target", "hf") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of name, target, hf (got {', '.join(given)})")
        if not given:
            self.name = "mlp"
        if self.name is not None:
            from qatkit.components.models import check_model_args

            check_model_args(self.name, self.args)
        return self

    @property
    def label(self) -> str:
        return self.name or self.target or str(self.hf)


def check_target(v: str) -> str:
    """An import path "package.module:callable" (the callable may be dotted: "module:Class.build")."""
    import re

    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", v):
        raise ValueError(f"an import target is 'module.path:callable' (e.g. 'my_model:Net'), got {v!r}")
    return v


class FloatStage(Strict):
    """The float baseline: trained here, or loaded from a safetensors ``checkpoint``."""

    checkpoint: FilePath | None = None
    """A safetensors state_dict (qatkit's, a plain one, or a Hugging Face folder's model.safetensors)."""
    train: Stages = Field(default_factory=TrainConfig)
    fold_batchnorm: bool = True

    @field_validator("checkpoint")
    @classmethod
    def _safetensors(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(
                f"{v.name} is a pickle, which can run code when loaded; qatkit reads safetensors only. Convert it "
                'once where you trust the file: python -c "import torch, safetensors.torch as st; '
                f"st.save_file(torch.load('{v.name}', weights_only=True), '{v.with_suffix('.safetensors').name}')\""
            )
        return v


class PTQConfig(Strict):
    calib_batches: int = Field(8, ge=1, le=100_000)


class Variant(Strict):
    """One quantized configuration: PTQ from the float model, then QAT warm-started from it."""

    name: Name
    quant: QuantRecipe
    """Rules and/or a preset; a preset name alone (``quant: int8``) is short for ``{preset: int8}``."""
    ptq: PTQConfig = Field(default_factory=PTQConfig)
    mixed_precision: MixedPrecision | None = None
    """Weight widths per layer under a bit budget, from measured sensitivity (recipe/checks.py)."""
    qat: Stages | None = Field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-4))
    """One QAT stage, or a chain of stages (seed 000's stabilise-then-fine-tune), or None for PTQ only."""

    @field_validator("quant", mode="before")
    @classmethod
    def _preset_name(cls, v: Any) -> Any:
        return {"preset": v} if isinstance(v, str) else v


class Recipe(Strict):
    name: Name = "run"
    description: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    base_dir: FilePath | None = None
    """The folder relative paths and import targets are resolved from (set to the recipe file's folder when a
    file is read, so a finished run can be re-exported from anywhere)."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    fp32: FloatStage = Field(default_factory=FloatStage)
    variants: list[Variant] = Field(min_length=1, max_length=64)
    export: ExportConfig = Field(default_factory=ExportConfig)
    cv: CVConfig | None = None
    """Cross-validation folds (see recipe/checks.py); None: one run on the data's own split."""
    criteria: Criteria = Field(default_factory=Criteria)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(sorted(dup))}")
        if "fp32" in names:
            raise ValueError("variant name 'fp32' is reserved for the float model")
        return v

    @model_validator(mode="after")
    def _fits_task(self) -> Recipe:
        from qatkit.tasks import TASKS

        task = TASKS[self.task.name]
        stages = [("fp32.train", self.fp32.train)] + [
            (f"variants[{i}].qat", v.qat) for i, v in enumerate(self.variants)
        ]
        for where, cfgs in stages:
            for j, cfg in enumerate(as_stages(cfgs)):
                at = f"{where}[{j}]" if isinstance(cfgs, list) else where
                if cfg.monitor is not None and cfg.monitor not in task.monitors:
                    raise ValueError(f"{at}.monitor: {cfg.monitor!r} is not a metric of task {task.name!r}; allowed: "
                                     f"{', '.join(task.monitors)}")  # fmt: skip
                if where == "fp32.train" and cfg.distill is not None:
                    raise ValueError(f"{at}.distill: the float stage has no teacher (distill is for QAT stages)")
                if where == "fp32.train" and cfg.weight_bits is not None:
                    raise ValueError(f"{at}.weight_bits: the float stage has no quantized weights")
            last = cfgs[-1] if isinstance(cfgs, list) and cfgs else cfgs
            if where != "fp32.train" and last is not None and last.weight_bits is not None:
                raise ValueError(f"{where}: the last QAT stage trains at the rules' own width; set the final width in "
                                 "quant and weight_bits on the earlier stages only")  # fmt: skip
                if not task.classes and (cfg.class_weights is not None or cfg.label_smoothing):
                    raise ValueError(f"{at}: class_weights and label_smoothing need classes (task {task.name!r})")
        return self

    def resolve(self, path: Path) -> Path:
        """A recipe path made absolute against :attr:`base_dir` (or the working directory)."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.base_dir or Path.cwd()) / path
