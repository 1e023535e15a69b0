"""Optional dependencies: import one, or fail with a message that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``; if it is missing, raise an ImportError naming ``qatkit[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'{what} needs the optional extra: pip install "qatkit[{extra}]" ({e})') from None
