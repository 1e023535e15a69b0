"""Full training state in one safetensors file: weights, optimiser, scheduler, grad scaler, RNG streams, counters.

Tensors go in the safetensors body under ``model/``, ``optim/``, ``scaler/`` and ``rng/`` prefixes; everything
else (param groups, scheduler and guard state, step, epoch) is JSON in the header. Loading never unpickles, and
refuses a malformed header or out-of-range counters with one line naming the file and the field.
"""

from __future__ import annotations

import random
from collections.abc import Callable
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


def _join(obj: Any, tensors: dict[str, torch.Tensor], path: Path, where: str) -> Any:
    """Inverse of :func:`_split`; a reference to a missing tensor or a bad dict entry is refused."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"{path}: {where} refers to tensor {obj['__tensor__']!r}, which is not in the file")
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        if not isinstance(obj["__dict__"], list) or not all(_is_entry(e) for e in obj["__dict__"]):
            raise CheckpointError(f"{path}: {where} is malformed (expected [key, value] pairs)")
        return {k: _join(v, tensors, path, f"{where}.{k}") for k, v in obj["__dict__"]}
    if isinstance(obj, dict):
        raise CheckpointError(f"{path}: {where} is malformed (a mapping that is neither a tensor nor a dict)")
    if isinstance(obj, list):
        return [_join(v, tensors, path, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def _is_entry(e: Any) -> bool:
    return isinstance(e, list) and len(e) == 2 and isinstance(e[0], (int, str)) and not isinstance(e[0], bool)


# ---- counters -------------------------------------------------------------------------------------------
def _int_from(low: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and v >= low


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _stats(v: Any) -> bool:
    keys = ("loss_sum", "n", "norm_sum", "norm_max", "steps", "skipped")
    return isinstance(v, dict) and all(_number(v.get(k)) for k in keys)


def _guards(v: Any) -> bool:
    counts = ("consecutive_nonfinite", "interventions_used")
    return isinstance(v, dict) and all(_int_from(0)(v.get(k)) for k in counts) and isinstance(v.get("log"), list)


COUNTERS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epoch": (_int_from(0), "an integer >= 0"),
    "skip": (_int_from(0), "an integer >= 0"),
    "step": (_int_from(0), "an integer >= 0"),
    "best_epoch": (_int_from(-1), "an integer >= -1"),
    "bad_epochs": (_int_from(0), "an integer >= 0"),
    "best_score": (
        _optional(lambda v: isinstance(v, list) and len(v) == 2 and all(map(_number, v))),
        "null or two numbers",
    ),  # fmt: skip
    "best_metrics": (lambda v: isinstance(v, dict), "a mapping"),
    "prev_acc": (_optional(_number), "null or a number"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of mappings"),
    "finished": (lambda v: v in (None, "early-stop", "gave-up"), "null, 'early-stop' or 'gave-up'"),
    "lr": (lambda v: _number(v) and 0 < v < float("inf"), "a positive number"),
    "stats": (_stats, "a mapping of loss_sum, n, norm_sum, norm_max, steps, skipped numbers"),
    "guards": (_guards, "a mapping of consecutive_nonfinite, interventions_used (integers >= 0) and a log list"),
}
"""What the training loop keeps in ``counters``: each field's test and what it must be."""


def check_counters(path: str | Path, counters: Any, limits: dict[str, int] | None = None, complete: bool = False):
    """Refuse counters of the wrong type or range, or past ``limits`` (e.g. the configured epochs).

    ``complete`` also requires every field the training loop keeps."""
    if not isinstance(counters, dict):
        raise CheckpointError(f"{path}: counters are {type(counters).__name__}, expected a mapping")
    for name, (ok, what) in COUNTERS.items():
        if name not in counters:
            if complete:
                raise CheckpointError(f"{path}: counters.{name} is missing")
            continue
        if not ok(counters[name]):
            raise CheckpointError(f"{path}: counters.{name} is {counters[name]!r}, expected {what}")
    for name, most in (limits or {}).items():
        if name in counters and counters[name] > most:
            raise CheckpointError(f"{path}: counters.{name} is {counters[name]}, more than the {most} this run has")


# ---- RNG ------------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, NumPy, torch (and initialised CUDA) RNG states as (JSON part, tensors)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(state), gauss]}
    return meta, tensors


def _check_rng(path: Path, meta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse RNG state that :func:`set_rng_state` could not restore, naming the field."""
    for name, dtype in (("rng/torch", torch.uint8), ("rng/numpy", torch.int64)):
        if name not in tensors or tensors[name].dtype != dtype or tensors[name].dim() != 1:
            raise CheckpointError(f"{path}: tensor {name!r} is missing or not a 1-D {dtype} tensor")
    np_ok = isinstance(meta, dict) and isinstance(meta.get("numpy"), list) and len(meta["numpy"]) == 4
    if not np_ok or meta["numpy"][0] != "MT19937" or tensors["rng/numpy"].numel() != 624:
        raise CheckpointError(f"{path}: rng.numpy is malformed (expected an MT19937 state)")
    py = meta.get("python")
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list) and len(py[1]) == 625):
        raise CheckpointError(f"{path}: rng.python is malformed (expected [version, 625 integers, gauss])")


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> None:
    """Restore the RNG streams saved by :func:`rng_state` (refused, unchanged, if malformed)."""
    _check_rng(Path(path), meta, tensors)
    try:
        kind, pos, has_gauss, cached = meta["numpy"]
        np_state = (kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)
        np.random.RandomState().set_state(np_state)  # validate before touching the global streams
        version, state, gauss = meta["python"]
        random.Random().setstate((version, tuple(state), gauss))
        torch.Generator().set_state(tensors["rng/torch"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: rng state cannot be restored ({str(e).splitlines()[0][:200]})") from None
    torch.set_rng_state(tensors["rng/torch"])
    np.random.set_state(np_state)
    random.setstate((version, tuple(state), gauss))
    _set_cuda_rng(tensors)


def _set_cuda_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore per-device CUDA RNG states when this machine has as many devices as the saving one."""
    n = sum(k.startswith("rng/cuda/") for k in tensors)
    if n and torch.cuda.is_available() and n == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(n)])


def frozen_parameters(model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that do not train."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


# ---- save / load ----------------------------------------------------------------------------------------
def save_training_state(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    counters: dict | None = None,
    fingerprint: dict | None = None,
    trainable_only: bool = False,
    full_states: tuple[dict, dict] | None = None,
) -> Path:
    """Write everything needed to continue training exactly where it stopped (atomically); ``trainable_only``
    leaves out the parameters that do not train (the caller rebuilds them identically before loading).
    ``full_states``: (model, optimizer) state dicts gathered from a sharded model, used instead of theirs."""
    skip = frozen_parameters(model) if trainable_only else set()
    model_sd, optim_sd = full_states or (model.state_dict(), optimizer.state_dict())
    tensors = {f"model/{k}": v for k, v in model_sd.items() if k not in skip}
    skeleton = {
        "optimizer": _split(optim_sd, "optim", tensors),
        "scheduler": _split(scheduler.state_dict(), "sched", tensors) if scheduler is not None else None,
        "scaler": _split(scaler.state_dict(), "scaler", tensors) if scaler is not None else None,
    }
    rng_meta, rng_tensors = rng_state()
    tensors.update(rng_tensors)
    meta = {"kind": "training-state", "state": skeleton, "rng": rng_meta, "counters": counters or {}}
    if trainable_only:
        meta["model_keys"] = "trainable"
    meta.update(fingerprint or {})
    return save_weights(path, tensors, meta)


def training_metadata(path: str | Path) -> dict:
    """The header of a training-state checkpoint, its skeleton checked (no tensors are loaded)."""
    meta = read_metadata(path)
    if meta.get("kind") != "training-state":
        raise CheckpointError(f"{path}: not a training-state checkpoint (kind {meta.get('kind')!r})")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: field 'state' is missing or not a mapping")
    for part in ("optimizer", "scheduler", "scaler"):
        if part not in state:
            raise CheckpointError(f"{path}: state.{part} is missing")
    if not isinstance(meta.get("rng"), dict):
        raise CheckpointError(f"{path}: field 'rng' is missing or not a mapping")
    check_counters(path, meta.get("counters"))
    return meta


def read_counters(path: str | Path, limits: dict[str, int] | None = None, complete: bool = False) -> dict:
    """The counters a training-state checkpoint was saved with, checked (no tensors are loaded)."""
    counters = training_metadata(path)["counters"]
    check_counters(path, counters, limits, complete)
    return counters


def load_training_state(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    expect: dict | None = None,
    restore_rng: bool = True,
    limits: dict[str, int] | None = None,
    complete: bool = False,
    sharded: bool = False,
) -> dict:
    """Restore a state written by :func:`save_training_state`; returns its counters.

    ``expect`` lists metadata that must match (e.g. the recipe fingerprint); ``limits`` and ``complete`` as in
    :func:`check_counters`. Header, counters, tensors and RNG are checked before anything is changed."""
    meta = training_metadata(path)
    counters = meta["counters"]
    check_counters(path, counters, limits, complete)
    tensors = load_weights(path, expect=expect)
    parts = {k: _join(v, tensors, Path(path), f"state.{k}") for k, v in meta["state"].items()}
    if restore_rng:
        _check_rng(Path(path), meta["rng"], tensors)
    model_sd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    want = model.state_dict()
    if meta.get("model_keys") == "trainable":  # frozen parameters were left out: they stay as the model has them
        frozen = frozen_parameters(model)
        want = {k: v for k, v in want.items() if k not in frozen}
    check_state_fits(path, want, model_sd)
    strict = len(want) == len(model.state_dict())
    if sharded:  # FSDP: every rank reads the full state into its shards
        from qatkit.train import fsdp

        fsdp.load_model_state(model, model_sd, strict=strict)
        if optimizer is not None:
            _restore_part(path, "optimizer", _Sharded(model, optimizer), parts["optimizer"])
    else:
        model.load_state_dict(model_sd, strict=strict)
        _restore_part(path, "optimizer", optimizer, parts["optimizer"])
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        _restore_part(path, name, obj, parts[name])
    if restore_rng:
        set_rng_state(meta["rng"], tensors, path)
    return counters


def _restore_part(path: str | Path, name: str, obj: Any, state: Any) -> None:
    """Load one of optimizer/scheduler/scaler, turning a state that does not fit into a CheckpointError."""
    if obj is None or (state is None and name != "optimizer"):
        return
    need = {"optimizer": ("state", "param_groups"), "scheduler": ("last_epoch",), "scaler": ()}[name]
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise CheckpointError(f"{path}: state.{name} is malformed (expected a mapping with {', '.join(need)})")
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: state.{name} does not fit this {name} ({str(e).splitlines()[0][:200]})"
        ) from None


class _Sharded:
    """An FSDP model's optimizer seen through ``load_state_dict`` (a full state keyed by parameter name)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def load_state_dict(self, state: dict) -> None:
        from qatkit.train import fsdp

        fsdp.load_optimizer_state(self.model, self.optimizer, state)
