"""Weights on disk: safetensors only (no pickled code runs on load), written atomically.

A file is written to a temporary name in the same folder, flushed and fsynced, then renamed over the
target, so a crash or a full disk never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "qatkit/1"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, foreign, or for another model."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Save a state_dict as safetensors with qatkit metadata (JSON-encoded values)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {"format": FORMAT}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return Path(path)


def require_regular_file(path: str | Path) -> None:
    """Refuse a missing path, a folder, a FIFO or a device (a FIFO would block the reader forever)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a checkpoint is a safetensors file)")


def read_metadata(path: str | Path, allow_foreign: bool = False) -> dict:
    """The qatkit metadata stored in a checkpoint (decoded); raises CheckpointError if unreadable.

    ``allow_foreign`` accepts a plain safetensors file without qatkit metadata (returns ``{}``).
    """
    from safetensors import safe_open

    require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({_short(e)})") from None
    if allow_foreign and meta.get("format") != FORMAT:  # a plain or Hugging Face file ({"format": "pt"})
        return {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qatkit checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    return {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}


def load_weights(path: str | Path, expect: dict | None = None, allow_foreign: bool = False) -> dict[str, torch.Tensor]:
    """Load a safetensors state_dict; with ``expect``, refuse one whose metadata differs on those keys.

    ``allow_foreign`` also takes plain safetensors files written by other tools (for warm starts).
    """
    from safetensors.torch import load_file

    path = Path(path)
    require_regular_file(path)
    meta = read_metadata(path, allow_foreign=allow_foreign and not expect)
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise CheckpointError(f"{path}: checkpoint is for {key}={meta.get(key)!r}, this run has {key}={want!r}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_short(e)})") from None


def check_state_fits(path: str | Path, want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Refuse a loaded state dict whose keys or shapes differ from the model's, naming the first differences."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint is for a different model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in want.items():
        if tuple(v.shape) != tuple(got[k].shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(got[k].shape)}, the model has {tuple(v.shape)}")


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
