"""The output folder: qatkit writes only inside it, never deletes what it did not write, and one run at a time.

A folder becomes a run folder when a run claims it: a marker file says qatkit owns the names it writes there
(checkpoints, logs, exported files, the report). A fresh run into a folder holding anything else refuses unless
``overwrite`` is given, and even then it only replaces qatkit's own names and refuses where a foreign file has
one of them. A lock file with the writer's PID refuses a second run into the same folder; a lock left by a
process that no longer exists is taken over.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from qatkit.base.config import RecipeError

MARKER = ".qatkit-run"
LOCK = ".qatkit.lock"
OWNED_DIRS = ("checkpoints", "stages", "tensorboard", "folds", "diagnose")
OWNED_FILES = ("report.md", "report.json", "report.html", "progress.json", "folds.json", "interventions.csv",
               "loss.png", MARKER, LOCK)  # fmt: skip
OWNED_GLOBS = ("*.safetensors", "*_train.csv", "*_steps.csv", ".*.tmp", "*_mixed_precision.yaml", "*_sensitivity.json",
               "*_sensitivity.md", "*_sensitivity.png")  # fmt: skip
"""Top-level names a run writes; exported files go in one folder per registered format (export.EXPORTERS)."""


class OutputError(RecipeError):
    """An output folder that qatkit may not write to (foreign files, another run at work, a path outside)."""


def owned_name(name: str) -> bool:
    """Whether ``name`` (an entry at the top of a run folder) is one qatkit writes."""
    from qatkit.export import EXPORTERS

    return (name in OWNED_DIRS or name in OWNED_FILES or name in EXPORTERS
            or any(fnmatch.fnmatchcase(name, g) for g in OWNED_GLOBS))  # fmt: skip


def is_run_folder(out: Path) -> bool:
    """A folder a qatkit run claimed (or one written by a qatkit version before the marker: progress.json)."""
    return (out / MARKER).is_file() or (out / "progress.json").is_file() or (out / "folds.json").is_file()


def check_ownership(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding files qatkit did not write (``overwrite``: allow them, but never replace them)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir() if p.name not in (LOCK, MARKER))
    foreign = [n for n in entries if not is_run_folder(out) or not owned_name(n)]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise OutputError(f"--out {out}: holds files qatkit did not write ({shown}); choose an empty or new folder, "
                          "or pass --overwrite to write there anyway (foreign files are never replaced)")  # fmt: skip
    clash = [n for n in foreign if owned_name(n)]
    if clash:
        raise OutputError(f"--out {out}: {clash[0]} was not written by qatkit and a run would replace it; move it "
                          "or choose another folder")  # fmt: skip


def claim(out: Path, overwrite: bool = False) -> None:
    """Check ``out`` (locked by this run) may be written and mark it as a run folder."""
    check_ownership(out, overwrite)
    if not (out / MARKER).is_file():
        (out / MARKER).write_text(json.dumps({"tool": "qatkit", "note": "qatkit owns the names it writes here"}))


def inside(out: Path, path: str | Path) -> Path:
    """``path``, refused unless it resolves to a place inside ``out`` (a second line behind safe names)."""
    path = Path(path)
    if not path.resolve().is_relative_to(out.resolve()):
        raise OutputError(f"{path}: outside the output folder {out}; nothing is written there")
    return path


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock (creating the folder) for the duration of a run; refuse if a live process holds it."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock) or _being_written(lock)
            if holder is not None and (holder.get("host") != me["host"] or _alive(holder.get("pid"))):
                raise OutputError(f"--out {out}: another qatkit run (PID {holder.get('pid')} on "
                                  f"{holder.get('host')}) is writing there; wait for it or choose another "
                                  f"folder (if it is gone, delete {lock})") from None  # fmt: skip
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise OutputError(f"--out {out}: could not take the lock {lock}")
    try:
        yield
    finally:
        if _holder(lock) == me:
            lock.unlink(missing_ok=True)


def _holder(lock: Path) -> dict | None:
    """The lock's owner ({pid, host}), or None for a lock that cannot be read (treated as stale)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _being_written(lock: Path) -> dict | None:
    """An unreadable lock younger than a few seconds: its writer is between creating and filling it."""
    try:
        young = time.time() - lock.stat().st_mtime < 5
    except OSError:
        return None
    return {"pid": "unknown", "host": socket.gethostname(), "young": True} if young else None


def _alive(pid: int | str | None) -> bool:
    if pid == "unknown":
        return True
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
