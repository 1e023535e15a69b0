"""Shared pieces of every validated config: strict models (unknown keys and coercions are errors), the recipe
error, and validation errors turned into one line per problem that names the field and what is allowed."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError


class RecipeError(ValueError):
    """A recipe that cannot be used, with the place of the fault in the message."""


def one_of(value: str, allowed: typing.Iterable[str], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError listing them."""
    allowed = sorted(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""A recipe, variant or stage name: it becomes part of file names, so letters, digits, ``_``, ``-`` and ``.`` only,
no leading dot, no path separators (nothing can point outside the output folder)."""


FilePath = Annotated[Path, pydantic.Strict(False)]
"""A path in a recipe: written as a string in YAML (the one field type that is converted)."""


class Strict(BaseModel):
    """A config section: unknown keys refused, no conversion between types (``'1e3'`` is not a number, ``true``
    is not 1), and no NaN or infinity in numbers."""

    model_config = ConfigDict(extra="forbid", frozen=False, strict=True, allow_inf_nan=False)


UNION_TAGS: set[str] = set()
"""Tags of discriminated unions (e.g. one training stage or a list of them); error paths leave them out."""


def _loc(loc: tuple, prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if part in UNION_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class reached by following ``loc`` from ``cls`` (for listing allowed keys)."""
    cur: Any = cls
    for part in loc:
        if isinstance(part, int) or part in UNION_TAGS:
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = _unwrap_model(cur.model_fields[part].annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: where it is (below ``prefix``), what is wrong, what is allowed."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            allowed = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"{_loc(loc, prefix)}: unknown key {loc[-1]!r} (allowed keys: {allowed})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{_loc(loc, prefix)}: {msg}{shown}")
    shown = lines[:MAX_SHOWN]
    if len(lines) > MAX_SHOWN:
        shown.append(f"and {len(lines) - MAX_SHOWN} more problem(s)")
    return "; ".join(shown)


MAX_SHOWN = 8
"""Problems listed in one error line; the rest are counted."""
