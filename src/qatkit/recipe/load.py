"""Reading recipes: YAML (safe loader) or a dict, validated into a :class:`Recipe`; errors are one line each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qatkit.base.config import RecipeError, format_validation_error
from qatkit.recipe.schema import Recipe


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict; raise :class:`RecipeError` naming the faulty field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {format_validation_error(e, Recipe)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and data.get("base_dir") is None:
        data = dict(data, base_dir=str(path.resolve().parent))
    return parse_recipe(data, str(path))
