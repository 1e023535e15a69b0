"""Optional dependencies: import one, or fail with a message that names the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``; if it is missing, raise an ImportError naming ``qatkit[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(_missing(what, extra, str(e))) from None


EXTRA_MODULES = {
    "tflite": ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
    "coreml": ("coremltools",),
    "executorch": ("executorch",),
}


def check_installed(extra: str, what: str) -> None:
    """Fail early (before any training) if a module of ``qatkit[extra]`` is missing, without importing it."""
    for module in EXTRA_MODULES[extra]:
        if importlib.util.find_spec(module) is None:
            raise ImportError(_missing(what, extra, f"no module {module!r}"))


def _missing(what: str, extra: str, why: str) -> str:
    return f'{what} needs the optional extra: pip install "qatkit[{extra}]" ({why})'
