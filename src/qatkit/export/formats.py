"""The export-format registry: each format module defines one :class:`Exporter` subclass, which registers
itself by its ``format`` name (``export.formats`` in a recipe); adding a format touches one file.

An exporter says which precisions a source model gets, writes one file, opens it in its runtime (once; the
accuracy run, the checks of what is inside and the timing share it), and runs it on named input arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from qatkit.base.batch import InputSpec
from qatkit.export.config import ExportConfig

if TYPE_CHECKING:
    from qatkit.export.diagnose import Diagnosis

EXPORTERS: dict[str, Exporter] = {}
"""Format name -> exporter instance, in the order the format modules were imported."""

Arrays = dict[str, np.ndarray]
"""Model inputs by name (InputSpec order), as runtimes take them."""


@dataclass
class Source:
    """A PyTorch model whose files are written: ``variant`` is "fp32" for the float model."""

    variant: str
    stage: str
    model: nn.Module
    outputs: torch.Tensor
    """The model's outputs on the test split (the reference for agreement)."""
    build: dict | None = None
    """How to rebuild the model (see run.rebuild.load_packed_model), stored in packed files."""
    reload: Callable[[Path], nn.Module] | None = None
    """Builds a ready model from a packed file alone (set by the run, which knows how models are built)."""

    @property
    def quantized(self) -> bool:
        return self.variant != "fp32"

    @property
    def stem(self) -> str:
        return "fp32" if not self.quantized else f"{self.variant}_{self.stage}"


@dataclass
class Artifact:
    source: Source
    format: str
    precision: str
    path: Path
    spec: InputSpec
    error: str | None = None
    handle: object = None
    """The file opened in its runtime (an ORT session, a LiteRT interpreter), opened once and shared."""


class Exporter:
    """One format. Subclasses set ``format``, ``runtime`` and ``suffix`` and register themselves."""

    format: ClassVar[str] = ""
    runtime: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    extra: ClassVar[str | None] = None
    """The optional dependency group the format needs (checked before any training)."""
    title: ClassVar[str] = ""
    """How messages name the format ("TFLite export")."""
    float_in_effect_fails: ClassVar[bool] = False
    """An integer file in which every quantized layer runs in float fails parity (where no recipe asks for that:
    ONNX files of per-group weights run in float by design)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.format:
            EXPORTERS[cls.format] = cls()

    def precisions(self, src: Source, cfg: ExportConfig) -> list[str]:
        raise NotImplementedError

    def write(self, src: Source, precision: str, path: Path, example: dict[str, torch.Tensor], spec: InputSpec,
              cfg: ExportConfig) -> None:  # fmt: skip
        """Write ``src.model`` at ``precision``; ``example``: a few rows of every input, by name."""
        raise NotImplementedError

    def open(self, art: Artifact, cfg: ExportConfig) -> object:
        """The file loaded in its runtime (see :func:`opened`)."""
        return None

    def runner(self, art: Artifact, cfg: ExportConfig) -> Callable[[Arrays], np.ndarray] | None:
        """Outputs of the file for all rows of the named inputs (None: cannot run here)."""
        return None

    def timer(self, art: Artifact, batch: int, sample: Arrays, cfg: ExportConfig, workdir: Path):
        """A no-argument call that runs the file once at ``batch`` (None: not timed here)."""
        return None

    def details(self, art: Artifact, cfg: ExportConfig) -> dict:
        """What is inside the file (integer kernels, op counts, stored weights)."""
        return {}

    def float_layers(self, art: Artifact, cfg: ExportConfig) -> list[str]:
        """Quantized layers that the runtime still runs in float (a slow int8 file must not pass unnoticed)."""
        return []

    def diagnose(self, model: nn.Module, path: Path, spec: InputSpec, inputs: dict[str, torch.Tensor]) -> Diagnosis:
        """Each quantized layer's output in the file's runtime against ``model`` on ``inputs``, in graph order
        (see export/diagnose.py); formats that cannot capture per-layer values do not override this."""
        raise NotImplementedError(f"{self.title or self.format} files cannot be diagnosed layer by layer")


def diagnosable() -> list[str]:
    """Formats whose exporter can compare a file with its model layer by layer."""
    return [f for f, e in EXPORTERS.items() if type(e).diagnose is not Exporter.diagnose]


def opened(art: Artifact, cfg: ExportConfig):
    """The artifact's file loaded in its runtime, once: details, the accuracy run and timing share it."""
    if art.handle is None:
        art.handle = EXPORTERS[art.format].open(art, cfg)
    return art.handle


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that quantize their weight (the ones an integer file should run in int8)."""
    from qatkit.nn.modules import QuantModule

    return [n for n, m in model.named_modules() if isinstance(m, QuantModule) and m.weight_quant is not None]
