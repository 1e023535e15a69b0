"""Shared pieces of every validated config: strict models (unknown keys are errors) and the recipe error."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict


class RecipeError(ValueError):
    """A recipe that cannot be used, with the place of the fault in the message."""


def one_of(value: str, allowed: typing.Iterable[str], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError listing them."""
    allowed = sorted(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)
