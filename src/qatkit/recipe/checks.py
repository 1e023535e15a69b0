"""Recipe sections about judging a run: cross-validation folds (``cv``) and success criteria (``criteria``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from qatkit.base.config import Name, Strict


class CVConfig(Strict):
    """Cross-validation: the whole job (FP32 -> PTQ -> QAT -> export -> verify) once per fold, one report.

    ``by: group``: one fold per value of the data's groups (leave-one-group-out: that group is the test set);
    ``k``: stratified k-fold over every row, seeded by the recipe's seed. Inside each fold's training part,
    validation is ``data.val_fraction`` of the rows (``val: fraction``, stratified) or one other group (``val:
    group``). ``folds`` runs a subset by name; ``workers`` runs folds in parallel processes.
    """

    by: Literal["group"] | None = None
    k: int | None = Field(None, ge=2, le=100)
    val: Literal["fraction", "group"] = "fraction"
    folds: list[Name] | None = Field(None, min_length=1, max_length=1000)
    workers: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _one_scheme(self) -> CVConfig:
        if (self.by is None) == (self.k is None):
            raise ValueError("give one of by: group (leave-one-group-out) or k: N (stratified k-fold)")
        if self.val == "group" and self.by is None:
            raise ValueError("val: group needs by: group (the data's groups)")
        return self


class Criteria(Strict):
    """What counts as success, checked on every fold (or the single run) and reported with a verdict; a run
    that misses one exits 1, like a parity failure. Drops are in points of the task's primary metric (accuracy
    in percent; R² x 100 for regression)."""

    max_qat_drop: float | None = Field(None, ge=0, le=100)
    """Each QAT model at most this many points below the FP32 model."""
    max_export_drop: float | None = Field(None, ge=0, le=100)
    """Each exported file of a quantized model at most this many points below its QAT (or PTQ) PyTorch model."""
    max_size_ratio: float | None = Field(None, gt=0, le=10)
    """Each exported file of a quantized model at most this fraction of the float file of the same format."""
    precisions: list[str] | None = Field(None, min_length=1, max_length=16)
    """The exported precisions the two file checks apply to (e.g. [hybrid]); default: every quantized file."""
    no_collapse: bool = False
    """No collapse-guard intervention in any QAT stage."""

    def any(self) -> bool:
        return any(v not in (None, False) for k, v in self.model_dump().items() if k != "precisions")


class MixedPrecision(Strict):
    """Weight widths chosen per layer: each layer the variant's rules quantize is measured alone at every
    ``candidates`` width (output divergence from the float model on ``eval_rows`` validation rows), then the
    widths with the least total divergence whose weight-count-weighted mean is at most ``budget_bits`` are
    written back as one rule per layer (``OUT/<variant>_mixed_precision.yaml``)."""

    budget_bits: float = Field(ge=1, le=8)
    candidates: list[Annotated[int, Field(ge=2, le=8)]] = Field([2, 3, 4, 8], min_length=1, max_length=7)
    eval_rows: int = Field(1024, ge=16, le=100_000)
