"""Full training state in one safetensors file: weights, optimiser, scheduler, grad scaler, RNG streams, counters.

Tensors go in the safetensors body under ``model/``, ``optim/``, ``scaler/`` and ``rng/`` prefixes; everything
else (param groups, scheduler and guard state, step, epoch) is JSON in the header. Loading never unpickles.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qatkit.io.checkpoint import CheckpointError, check_state_fits, load_weights, read_metadata, save_weights


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor in a nested dict/list into ``tensors`` (keyed by path), leaving a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _split(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _key(k: Any) -> Any:
    if isinstance(k, (int, str)):
        return k
    raise TypeError(f"checkpoint dict keys must be int or str, got {type(k).__name__}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_split`."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, NumPy and torch RNG states as (JSON part, tensors)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(keys.astype(np.int64))}
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(state), gauss]}
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save_training_state(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    counters: dict | None = None,
    fingerprint: dict | None = None,
) -> Path:
    """Write everything needed to continue training exactly where it stopped (atomically)."""
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model.state_dict().items()}
    skeleton = {
        "optimizer": _split(optimizer.state_dict(), "optim", tensors),
        "scheduler": _split(scheduler.state_dict(), "sched", tensors) if scheduler is not None else None,
        "scaler": _split(scaler.state_dict(), "scaler", tensors) if scaler is not None else None,
    }
    rng_meta, rng_tensors = rng_state()
    tensors.update(rng_tensors)
    meta = {"kind": "training-state", "state": skeleton, "rng": rng_meta, "counters": counters or {}}
    meta.update(fingerprint or {})
    return save_weights(path, tensors, meta)


def read_counters(path: str | Path) -> dict:
    """The counters a training-state checkpoint was saved with (no tensors are loaded)."""
    meta = read_metadata(path)
    if meta.get("kind") != "training-state":
        raise CheckpointError(f"{path}: not a training-state checkpoint (kind {meta.get('kind')!r})")
    return meta["counters"]


def load_training_state(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    expect: dict | None = None,
    restore_rng: bool = True,
) -> dict:
    """Restore a state written by :func:`save_training_state`; returns its counters.

    ``expect`` lists metadata that must match (e.g. the recipe fingerprint); any difference is refused.
    """
    meta = read_metadata(path)
    if meta.get("kind") != "training-state":
        raise CheckpointError(f"{path}: not a training-state checkpoint (kind {meta.get('kind')!r})")
    tensors = load_weights(path, expect=expect)
    model_sd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    check_state_fits(path, model.state_dict(), model_sd)
    model.load_state_dict(model_sd)
    state = meta["state"]
    if optimizer is not None:
        optimizer.load_state_dict(_join(state["optimizer"], tensors))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(_join(state["scheduler"], tensors))
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(_join(state["scaler"], tensors))
    if restore_rng:
        set_rng_state(meta["rng"], tensors)
    return meta["counters"]
