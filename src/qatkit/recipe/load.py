"""Reading recipes: YAML (safe loader) or a dict, validated into a :class:`Recipe`; errors are one line each."""

from __future__ import annotations

import re
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads `lr: 1e-4` as the string "1e-4", which strict recipes would refuse
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
"""A recipe nests a few levels (variants[i].quant.rules[j].weight.bits): anything deeper is not a recipe."""


def read_yaml(path: str | Path, what: str = "a recipe") -> Any:
    """The data in a small YAML file: a regular UTF-8 file of at most 1 MiB, nested at most 32 levels, no key
    given twice, YAML 1.2 numbers; a RecipeError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():  # a FIFO would block the reader
        raise RecipeError(f"{what} file not found: {path}" if not path.exists() else f"{path}: not a regular file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size} bytes; {what} is at most {MAX_RECIPE_BYTES} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    if _depth(data) > MAX_DEPTH:
        raise RecipeError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    return data


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (see :func:`read_yaml` for what the file itself must be)."""
    data = read_yaml(path)
    if isinstance(data, dict) and data.get("base_dir") is None:
        data = dict(data, base_dir=str(Path(path).resolve().parent))
    return parse_recipe(data, str(path))


def _depth(obj: Any, level: int = 0, seen: set[int] | None = None) -> int:
    """How deeply ``obj`` nests lists and mappings (stops past MAX_DEPTH; a YAML alias is walked once)."""
    seen = set() if seen is None else seen
    if level > MAX_DEPTH or not isinstance(obj, (dict, list)) or id(obj) in seen:
        return level
    seen.add(id(obj))
    items = obj.values() if isinstance(obj, dict) else obj
    return max((_depth(v, level + 1, seen) for v in items), default=level + 1)
