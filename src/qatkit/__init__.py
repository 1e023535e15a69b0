"""qatkit: quantization-aware training for PyTorch, from float baseline to a verified int8 file.

report = qatkit.prepare(model, "int8")      # swap layers, see what was quantized
qatkit.calibrate(model, loader, 8)          # PTQ: observe activation ranges
...train as usual...                        # QAT: fake quantization is on
qatkit.export_onnx(model, example, "m.onnx")
"""

from qatkit.recipe import QuantRecipe, Recipe, RecipeError, load_recipe, parse_recipe
from qatkit.transform.calibrate import calibrate, set_fake_quant
from qatkit.transform.prepare import LayerReport, prepare, quant_status, unprepare
from qatkit.transform.warm_start import WarmStartReport, warm_start

__version__ = "0.1.0"


def run(recipe, out_dir="runs/run", model=None, data=None, **kwargs):
    """Run a recipe (a Recipe, a dict or a YAML path) end to end, once per fold when it has ``cv:``; ``model``
    (an nn.Module or a factory) and ``data`` (a DataSplits, or (train, val, test) data sets) may be given
    directly (see runner/pipeline.py and runner/folds.py)."""
    from pathlib import Path

    from qatkit.runner.folds import run_folds
    from qatkit.runner.pipeline import run as _run

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    if data is not None and not hasattr(data, "train"):
        data = _splits(recipe, data)
    return (run_folds if recipe.cv is not None else _run)(recipe, out_dir, model=model, data=data, **kwargs)


def _splits(recipe, datasets):
    """DataSplits from (train, test) or (train, val, test) data sets given in Python."""
    from qatkit.components.datasets import from_datasets

    return from_datasets(datasets, recipe.task.name, recipe.data.val_fraction, "Python data")


def verify(model, test, out_dir, formats=("onnx",), **kwargs):
    """Export a model trained with your own loop, run every file in its runtime on ``test`` and report (see
    :func:`qatkit.runner.check.verify_model`)."""
    from qatkit.runner.check import verify_model

    return verify_model(model, test, out_dir, formats, **kwargs)


def export_onnx(*args, **kwargs):
    """Export a prepared model to an int8 QDQ ONNX file (see :func:`qatkit.export.onnx.export_onnx`)."""
    from qatkit.export.onnx import export_onnx as _export

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
    "run",
    "set_fake_quant",
    "unprepare",
    "verify",
    "warm_start",
]
