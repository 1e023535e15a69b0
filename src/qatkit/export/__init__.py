"""Export formats. Importing this package registers every format in ``EXPORTERS`` (see formats.py)."""

from qatkit.export import coreml, executorch, onnx, packed, tflite  # noqa: F401  (each module registers its exporter)
from qatkit.export.formats import EXPORTERS, Artifact, Exporter, Source

__all__ = ["EXPORTERS", "Artifact", "Exporter", "Source"]
