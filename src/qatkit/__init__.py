"""qatkit: quantization-aware training for PyTorch, from float baseline to a verified int8 file.

report = qatkit.prepare(model, "int8")      # swap layers, see what was quantized
qatkit.calibrate(model, loader, 8)          # PTQ: observe activation ranges
...train as usual...                        # QAT: fake quantization is on
qatkit.export_onnx(model, example, "m.onnx")
"""

from .prepare import LayerReport, prepare, quant_status, unprepare
from .ptq import calibrate, set_fake_quant
from .recipe import QuantRecipe, Recipe, RecipeError, load_recipe, parse_recipe
from .warmstart import WarmStartReport, warm_start

__version__ = "0.1.0"


def export_onnx(*args, **kwargs):
    """Export a prepared model to an int8 QDQ ONNX file (see :func:`qatkit.export.onnx.export_onnx`)."""
    from .export.onnx import export_onnx as _export

    return _export(*args, **kwargs)


__all__ = [
    "LayerReport",
    "QuantRecipe",
    "Recipe",
    "RecipeError",
    "WarmStartReport",
    "calibrate",
    "export_onnx",
    "load_recipe",
    "parse_recipe",
    "prepare",
    "quant_status",
    "set_fake_quant",
    "unprepare",
    "warm_start",
]
