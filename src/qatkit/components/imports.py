"""The user's own code by import path ("package.module:callable"), as torchtune's ``_component_``: the recipe's
folder is searched first, then the working directory, then installed packages."""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qatkit.base.config import RecipeError


@contextmanager
def search_path(*folders: Path | None):
    """``folders`` put first on ``sys.path`` for the duration (the recipe's folder, then the working directory)."""
    added = [str(Path(f).resolve()) for f in folders if f is not None]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)


def import_target(target: str, base_dir: Path | None = None, what: str = "target") -> Any:
    """The object at ``module:attr.path``; a one-line RecipeError says what could not be imported and where it
    was looked for."""
    module_name, _, attr = target.partition(":")
    _forget_other_copy(module_name, base_dir)
    with search_path(base_dir, Path.cwd()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            where = f"{base_dir}, the working directory" if base_dir else "the working directory"
            missing = f" (missing module {e.name!r})" if e.name != module_name else ""
            raise RecipeError(f"{what} {target!r}: cannot import {module_name!r}{missing}; looked in {where} and "
                              "installed packages") from None  # fmt: skip
        except Exception as e:  # the user's module failed while importing: say where
            raise RecipeError(f"{what} {target!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = ", ".join(n for n in dir(module) if not n.startswith("_"))[:300]
            raise RecipeError(f"{what} {target!r}: {module_name!r} has no {attr!r} (it has: {names})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{what} {target!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _forget_other_copy(module_name: str, base_dir: Path | None) -> None:
    """Two recipes in one process may each bring a ``model.py``: drop an imported module of that name when the
    recipe's folder holds another file for it, so the recipe gets its own."""
    if base_dir is None:
        return
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    own = [Path(base_dir) / f"{top}.py", Path(base_dir) / top / "__init__.py"]
    mine = next((f.resolve() for f in own if f.is_file()), None)
    if loaded is None or mine is None or Path(getattr(loaded, "__file__", "") or "").resolve() == mine:
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def call_target(target: str, args: dict, base_dir: Path | None = None, what: str = "target") -> Any:
    """``import_target(target)(**args)``; bad arguments are one line naming the target."""
    fn = import_target(target, base_dir, what)
    try:
        with search_path(base_dir, Path.cwd()):
            return fn(**args)
    except TypeError as e:
        raise RecipeError(f"{what} {target!r}: bad args {args}: {e}") from None
