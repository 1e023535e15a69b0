"""Recipes: YAML files validated by pydantic. Unknown keys and bad values fail with the field's place."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .config_base import RecipeError, Strict, one_of
from .presets import PRESETS, preset_rules
from .quant.observers import OBSERVERS
from .quant.spec import QuantSpec
from .train_config import STAGE_TAGS, Stages, TrainConfig


class TensorQuant(Strict):
    """Settings for one tensor kind; defaults differ for weights and activations (see subclasses)."""

    bits: int = Field(8, ge=2, le=8)
    signed: bool = True
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = Field(0, ge=0)
    narrow_range: bool = False
    observer: str = "minmax"
    learnable: bool = False
    percentile: float = Field(99.99, gt=50.0, le=100.0)

    @field_validator("observer")
    @classmethod
    def _observer(cls, v: str) -> str:
        return one_of(v, OBSERVERS, "observer")

    @model_validator(mode="after")
    def _group(self) -> TensorQuant:
        if self.granularity == "group" and self.group_size == 0:
            raise ValueError("granularity 'group' needs group_size > 0")
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range needs signed: true")
        return self

    def to_spec(self) -> QuantSpec:
        return QuantSpec(**self.model_dump())


class WeightQuant(TensorQuant):
    """Weights: signed, symmetric, one scale per output channel unless told otherwise."""


class ActivationQuant(TensorQuant):
    """Layer inputs: unsigned asymmetric per-tensor 8-bit, the layout ONNX Runtime fuses into int8 kernels."""

    signed: bool = False
    symmetric: bool = False
    granularity: Literal["tensor"] = "tensor"


class Rule(Strict):
    """Which layers to quantize and how. ``match``/``exclude``: globs on qualified names, or ``re:REGEX``."""

    match: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    weight: WeightQuant | None = Field(default_factory=WeightQuant)
    activation: ActivationQuant | None = None
    output: ActivationQuant | None = None
    quantize: bool = True

    @field_validator("match", "exclude", "types", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        from .nn.modules import QUANT_MODULES

        names = [t.__name__ for t in QUANT_MODULES]
        return [one_of(t, names, "layer type") for t in v]

    @field_validator("match", "exclude")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"bad regular expression {p!r}: {e}") from None
        return v

    def describe(self) -> str:
        parts = []
        if self.match:
            parts.append("match=" + ",".join(self.match))
        if self.types:
            parts.append("types=" + ",".join(self.types))
        if self.exclude:
            parts.append("exclude=" + ",".join(self.exclude))
        return " ".join(parts) or "all layers"


class QuantRecipe(Strict):
    """A preset by name and/or explicit rules; explicit rules come first, so they override the preset."""

    preset: str | None = None
    rules: list[Rule] = Field(default_factory=list)
    outputs: Literal["rules", "where_needed"] = "rules"
    """``rules``: outputs are quantized where a rule says ``output:``. ``where_needed``: also every quantized
    layer whose output feeds anything but another quantized layer (pooling, residual add, the logits), with the
    default 8-bit activation settings, so every quantized layer exports as an integer kernel (see graph.py)."""

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        return None if v is None else one_of(v, PRESETS, "preset")

    @model_validator(mode="after")
    def _nonempty(self) -> QuantRecipe:
        if self.preset is None and not self.rules:
            raise ValueError(f"give a preset ({', '.join(sorted(PRESETS))}) or at least one rule")
        return self

    def resolved_rules(self) -> list[tuple[str, Rule]]:
        """(label, rule) pairs in matching order: the recipe's own rules, then the preset's."""
        out = [(f"rule {i}", r) for i, r in enumerate(self.rules)]
        if self.preset:
            out += [(f"preset {self.preset}[{i}]", Rule(**r)) for i, r in enumerate(preset_rules(self.preset))]
        return out


class DataConfig(Strict):
    name: str = "digits"
    batch_size: int = Field(64, ge=1)
    val_fraction: float = Field(0.15, ge=0.0, lt=0.9)
    num_workers: int = Field(0, ge=0)
    persistent_workers: bool = False
    prefetch_factor: int | None = Field(None, ge=1)
    pin_memory: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from .data import DATASETS

        return one_of(v, DATASETS, "dataset")


class ModelConfig(Strict):
    name: str = "mlp"
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from .models import MODELS

        return one_of(v, MODELS, "model")


class FloatStage(Strict):
    """The float baseline: trained here, or loaded from a safetensors ``checkpoint``."""

    checkpoint: Path | None = None
    train: Stages = Field(default_factory=TrainConfig)
    fold_batchnorm: bool = True


class PTQConfig(Strict):
    calib_batches: int = Field(8, ge=1)


class Variant(Strict):
    """One quantized configuration: PTQ from the float model, then QAT warm-started from it."""

    name: str = Field(min_length=1)
    quant: QuantRecipe
    ptq: PTQConfig = Field(default_factory=PTQConfig)
    qat: Stages | None = Field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-4))
    """One QAT stage, or a chain of stages (seed 000's stabilise-then-fine-tune), or None for PTQ only."""


FORMATS = ("onnx", "tflite", "coreml", "packed")


class TFLiteExport(Strict):
    """LiteRT files: ``fp32``, ``fp16`` and ``dynamic_int8`` come from the float model, ``int8`` (full integer,
    the source's own scales) from each quantized model; ``io`` is the int8 files' input/output type."""

    precisions: list[Literal["fp32", "fp16", "dynamic_int8", "int8"]] = Field(
        default_factory=lambda: ["fp32", "dynamic_int8", "int8"]
    )
    io: Literal["float", "int8"] = "float"


class CoreMLExport(Strict):
    """Core ML files: ``fp16`` from the float model, ``int8`` (weights on the source's own scales) from each
    quantized model."""

    precisions: list[Literal["fp16", "int8"]] = Field(default_factory=lambda: ["fp16", "int8"])


class ExportConfig(Strict):
    """Which files to write and verify, and when a file counts as a parity failure."""

    formats: list[Literal["onnx", "tflite", "coreml", "packed"]] = Field(default_factory=lambda: ["onnx"])
    tflite: TFLiteExport = Field(default_factory=TFLiteExport)
    coreml: CoreMLExport = Field(default_factory=CoreMLExport)
    min_agreement: float = Field(0.99, ge=0, le=1)
    """Top-1 agreement with the source model below which an integer file fails parity."""
    max_accuracy_drop: float = Field(0.02, ge=0, le=1)
    """Accuracy drop (fraction) below the source model beyond which any file fails parity."""
    allow_parity_failure: bool = False
    """Report parity failures but let ``qatkit run`` exit 0."""
    latency_batches: list[int] = Field(default_factory=lambda: [1, 64])
    latency_threads: int = Field(1, ge=1)
    latency_seconds: float = Field(0.5, gt=0)


class Recipe(Strict):
    name: str = "run"
    description: str = ""
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    fp32: FloatStage = Field(default_factory=FloatStage)
    variants: list[Variant] = Field(min_length=1)
    export: ExportConfig = Field(default_factory=ExportConfig)

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


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part in STAGE_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class reached by following ``loc`` from ``cls`` (for listing allowed keys)."""
    cur: Any = cls
    for part in loc:
        if isinstance(part, int) or part in STAGE_TAGS:
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = _unwrap_model(cur.model_fields[part].annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, root: type[BaseModel] = Recipe) -> str:
    """One line per problem: where it is, what is wrong, what is allowed."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            allowed = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"{_loc(loc)}: unknown key {loc[-1]!r} (allowed keys: {allowed})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{_loc(loc)}: {msg}{shown}")
    return "; ".join(lines)


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict; raise :class:`RecipeError` naming the faulty field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {format_validation_error(e)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_recipe(data, str(path))


def parse_quant(data: dict[str, Any] | str | QuantRecipe) -> QuantRecipe:
    """A QuantRecipe from a preset name, a dict, or an existing QuantRecipe."""
    if isinstance(data, QuantRecipe):
        return data
    if isinstance(data, str):
        data = {"preset": data}
    try:
        return QuantRecipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"quant: {format_validation_error(e, QuantRecipe)}") from None
