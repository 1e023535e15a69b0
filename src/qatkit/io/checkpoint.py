"""Weights on disk: safetensors only (no pickled code runs on load), written atomically.

A file is written to a temporary name in the same folder, flushed and fsynced, then renamed over the
target, so a crash or a full disk never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

FORMAT = "qatkit/1"
HASH_KEY = "sha256"
"""Metadata key of the content hash: SHA-256 over every tensor's name, dtype, shape and bytes (in name order)."""


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, foreign, or for another model."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (all or nothing)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextmanager
def atomic_path(path: str | Path):
    """A temporary name in ``path``'s folder to write to; on success it is fsynced and renamed to ``path``
    (all or nothing), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
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
    from safetensors.torch import save_file

    tensors, storages = {}, set()
    for k, v in state.items():  # no copies of the state (a 0.6B model's optimizer state is GBs): only tensors
        t = v.detach().cpu().contiguous()  # that share storage with another (tied weights) are cloned
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in storages and t.numel() else t
        storages.add(ptr)
    meta = {"format": FORMAT}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    meta[HASH_KEY] = json.dumps(content_hash(tensors))
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return Path(path)


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and raw bytes, so a flipped bit anywhere is detected."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


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
    try:
        return {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed qatkit metadata ({_short(e)})") from None


def load_weights(path: str | Path, expect: dict | None = None, allow_foreign: bool = False) -> dict[str, torch.Tensor]:
    """Load a safetensors state_dict; with ``expect``, refuse one whose metadata differs on those keys.

    ``allow_foreign`` also takes plain safetensors files written by other tools (for warm starts).
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = _checked_metadata(path, expect, allow_foreign)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_short(e)})") from None
    if meta and HASH_KEY not in meta:
        raise CheckpointError(f"{path}: no content hash in the metadata (written by an older qatkit; rerun the stage)")
    if meta and meta[HASH_KEY] != content_hash(tensors):
        raise CheckpointError(f"{path}: content hash mismatch: the file was altered or damaged after it was written")
    check_finite(path, tensors)
    return tensors


def _checked_metadata(path: Path, expect: dict | None, allow_foreign: bool = False) -> dict:
    require_regular_file(path)
    meta = read_metadata(path, allow_foreign=allow_foreign and not expect)
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise CheckpointError(f"{path}: checkpoint is for {key}={meta.get(key)!r}, this run has {key}={want!r}")
    return meta


class VerifiedWeights:
    """A qatkit checkpoint checked in full (metadata, content hash, finite values) one tensor at a time, never
    whole in memory; ``stored`` holds empty meta-device tensors of each name, shape and dtype, and ``read(names)``
    loads tensors again, each refused unless its bytes hash as they did when checked (a file replaced or altered
    meanwhile cannot slip in). The file is not kept open: its mapped pages would count as resident memory."""

    def __init__(self, path: str | Path, expect: dict | None = None, check=None):
        self.path = Path(path)
        meta = _checked_metadata(self.path, expect)
        if HASH_KEY not in meta:
            raise CheckpointError(f"{path}: no content hash in the metadata (written by an older qatkit; rerun the "
                                  "stage)")  # fmt: skip
        self.digests: dict[str, str] = {}
        self.stored = self._verify(meta[HASH_KEY], check)

    def _verify(self, want_hash: str, check) -> dict[str, torch.Tensor]:
        """Hash every tensor; ``check(name, tensor)`` and finiteness problems are reported after the hash."""
        h, stored, problem = hashlib.sha256(), {}, None
        with self._open() as f:
            for name in sorted(f.keys()):
                t = self._get(f, name)
                _hash_tensor(h, name, t)
                self.digests[name] = _digest(name, t)
                stored[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
                try:
                    if problem is None:
                        check_finite(self.path, {name: t})
                        if check is not None:
                            check(name, t)
                except CheckpointError as e:
                    problem = e
        if want_hash != h.hexdigest():
            raise CheckpointError(f"{self.path}: content hash mismatch: the file was altered or damaged after it "
                                  "was written")  # fmt: skip
        if problem is not None:
            raise problem
        return stored

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, each as it was when checked."""
        with self._open() as f:
            out = {n: self._get(f, n) for n in names}
        for n, t in out.items():
            if self.digests.get(n) != _digest(n, t):
                raise CheckpointError(f"{self.path}: tensor {n!r} changed after the file was checked")
        return out

    def _open(self):
        from safetensors import safe_open

        try:
            return safe_open(str(self.path), framework="pt")
        except Exception as e:
            raise CheckpointError(f"{self.path}: corrupt or truncated checkpoint ({_short(e)})") from None

    def _get(self, f, name: str) -> torch.Tensor:
        try:
            return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}: corrupt or truncated checkpoint ({_short(e)})") from None

    def __enter__(self) -> VerifiedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.digests.clear()


def _digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, name, t)
    return h.hexdigest()


def check_finite(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or inf in any floating-point tensor, naming the first such tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} holds {bad} NaN or inf value(s) of {t.numel()}")


def check_state_fits(
    path: str | Path, want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], finite: bool = True
) -> None:
    """Refuse a loaded state dict whose keys or shapes differ from the model's, naming the first differences;
    ``finite=False`` for ``got`` on the meta device (``VerifiedWeights`` checked the values)."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint is for a different model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in want.items():
        if tuple(v.shape) != tuple(got[k].shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(got[k].shape)}, the model has {tuple(v.shape)}")
        if v.dtype != got[k].dtype:
            raise CheckpointError(f"{path}: {k} has dtype {got[k].dtype}, the model has {v.dtype}")
    if finite:
        check_finite(path, got)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
