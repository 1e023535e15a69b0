"""Recipes: the schema of a run and how it is read."""

from qatkit.base.config import RecipeError
from qatkit.export.config import FORMATS, CoreMLExport, ExportConfig, TFLiteExport
from qatkit.recipe.checks import Criteria, CVConfig, MixedPrecision
from qatkit.recipe.load import load_recipe, parse_recipe
from qatkit.recipe.schema import DataConfig, FloatStage, ModelConfig, PTQConfig, Recipe, TaskConfig, Variant
from qatkit.transform.rules import ActivationQuant, QuantRecipe, Rule, TensorQuant, WeightQuant, parse_quant

__all__ = [
    "FORMATS",
    "ActivationQuant",
    "CoreMLExport",
    "CVConfig",
    "Criteria",
    "DataConfig",
    "ExportConfig",
    "FloatStage",
    "MixedPrecision",
    "ModelConfig",
    "PTQConfig",
    "QuantRecipe",
    "Recipe",
    "RecipeError",
    "Rule",
    "TaskConfig",
    "TFLiteExport",
    "TensorQuant",
    "Variant",
    "WeightQuant",
    "load_recipe",
    "parse_quant",
    "parse_recipe",
]
