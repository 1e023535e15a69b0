"""Quantization rules as validated data: which layers to quantize (globs, types), with which weight, input and
output settings; named presets expand to the same rules. One planner (prepare.plan) reads them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from qatkit.base.config import RecipeError, Strict, format_validation_error, one_of
from qatkit.quant.observers import OBSERVERS
from qatkit.quant.spec import QuantSpec
from qatkit.transform.presets import PRESETS, preset_rules


class TensorQuant(Strict):
    """Settings for one tensor kind; defaults differ for weights and activations (see subclasses)."""

    bits: int = Field(8, ge=2, le=8)
    signed: bool = True
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = Field(0, ge=0, le=1 << 20)
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


LOW_BITS = 3
"""Weights of at most this width default to learned (LSQ) scales initialised by an MSE search. Measured on the
digits CNN with every layer quantized (bench/low_bit.py, means of five seeds), over min-max scales: +1.1 points at
3 bits, +5.3 at 2 bits; at 4 bits 0.8 and 1.5 points worse in two of three earlier runs (4 bits keeps min-max)."""


class WeightQuant(TensorQuant):
    """Weights: signed, symmetric, one scale per output channel unless told otherwise; at ``LOW_BITS`` or fewer,
    learned scales (``learnable``) from an MSE start (``observer``) unless those are given."""

    @model_validator(mode="before")
    @classmethod
    def _low_bit_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("bits"), int) and data["bits"] <= LOW_BITS:
            data = {"learnable": True, **data}
            if data["learnable"] is True:
                data = {"observer": "mse", **data}
        return data


class ActivationQuant(TensorQuant):
    """Layer inputs: unsigned asymmetric per-tensor 8-bit, the layout ONNX Runtime fuses into int8 kernels."""

    signed: bool = False
    symmetric: bool = False
    granularity: Literal["tensor"] = "tensor"


class Rule(Strict):
    """Which layers to quantize and how. ``match``/``exclude``: globs on qualified names, or ``re:REGEX``."""

    match: list[str] = Field(default_factory=list, max_length=1000)
    types: list[str] = Field(default_factory=list, max_length=100)
    exclude: list[str] = Field(default_factory=list, max_length=1000)
    weight: WeightQuant | None = Field(default_factory=WeightQuant)
    activation: ActivationQuant | None = None
    output: ActivationQuant | Literal[False] | None = None
    """Quantize the layer's output with these settings; None: only where ``outputs: where_needed`` asks for it;
    ``false``: never, not even where needed."""
    quantize: bool = True

    @field_validator("match", "exclude", "types", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, v: Any) -> Any:
        if v is None or v is False or isinstance(v, (dict, ActivationQuant)):
            return v
        raise ValueError("give output settings ({} for the 8-bit defaults), or false for never")

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        from qatkit.nn.modules import QUANT_MODULES

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
    rules: list[Rule] = Field(default_factory=list, max_length=1000)
    outputs: Literal["rules", "where_needed"] = "where_needed"
    """``where_needed`` (the default): outputs are quantized where a rule says ``output:``, and also for every
    quantized layer whose output feeds anything but another quantized layer (pooling, residual add, the logits),
    with the default 8-bit activation settings, so every quantized layer exports as an integer kernel (see
    transform/graph.py), except layers whose rule says ``output: false``. A model torch.fx cannot trace falls
    back to the rules' outputs, with a note in the layer report. ``rules``: only where a rule says ``output:``."""

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
