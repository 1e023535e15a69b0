"""What the recipe's ``export`` section says: which formats and precisions to write, and the parity limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from qatkit.base.config import Strict, one_of

FORMATS = ("onnx", "tflite", "coreml", "executorch", "packed")


class TFLiteExport(Strict):
    """LiteRT files: ``fp32``, ``fp16`` and ``dynamic_int8`` come from the float model; ``int8`` (full integer,
    the source's own scales) and ``hybrid`` (the same, with the layers left float storing int8 weights, float
    compute) from each quantized model; ``int8_weights`` (weight-only int8, float compute) from both. ``io`` is
    the int8/hybrid files' input/output type."""

    precisions: list[Literal["fp32", "fp16", "dynamic_int8", "int8", "hybrid", "int8_weights"]] = Field(
        default_factory=lambda: ["fp32", "dynamic_int8", "int8"]
    )
    io: Literal["float", "int8"] = "float"
    strip_names: bool = False
    """Drop internal tensor names (debug strings) from every LiteRT file: smaller files, same graph; keep them
    for reading a file in a viewer."""


class CoreMLExport(Strict):
    """Core ML files: ``fp16`` from the float model, ``int8`` (weights on the source's own scales) from each
    quantized model."""

    precisions: list[Literal["fp16", "int8"]] = Field(default_factory=lambda: ["fp16", "int8"])


class ExecuTorchExport(Strict):
    """ExecuTorch files (XNNPACK delegate): ``fp32`` from the float model, ``int8`` (the source's own scales)
    from each quantized model. ``max_batch``: the largest batch a file takes (its planned memory grows with it)."""

    precisions: list[Literal["fp32", "int8"]] = Field(default_factory=lambda: ["fp32", "int8"])
    max_batch: int = Field(256, ge=1, le=65536)


class ExportConfig(Strict):
    """Which files to write and verify, and when a file counts as a parity failure."""

    formats: list[str] = Field(default_factory=lambda: ["onnx"], max_length=16)
    """Registered formats (export/formats.py): onnx, tflite, coreml, executorch, packed."""
    tflite: TFLiteExport = Field(default_factory=TFLiteExport)
    coreml: CoreMLExport = Field(default_factory=CoreMLExport)
    executorch: ExecuTorchExport = Field(default_factory=ExecuTorchExport)
    min_agreement: float = Field(0.99, ge=0, le=1)
    """Top-1 agreement with the source model below which an integer file fails parity."""
    max_accuracy_drop: float = Field(0.02, ge=0, le=1)
    """Drop of the task's primary metric (accuracy; R² for regression) below the source model beyond which any
    file fails parity."""
    max_rel_error: float = Field(0.05, gt=0, le=1e6)
    """Regression: relative error of an integer file's outputs (RMS difference / spread of the source's outputs)
    above which it fails parity."""
    allow_parity_failure: bool = False
    """Report parity failures but let ``qatkit run`` exit 0."""
    latency_batches: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [1, 64], max_length=8)

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        from qatkit.export import EXPORTERS

        return list(dict.fromkeys(one_of(f, EXPORTERS, "export format") for f in v))

    latency_threads: int = Field(1, ge=1, le=256)
    latency_seconds: float = Field(0.5, gt=0, le=600)
