"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for training under torchrun: the trainable state sharded.

Every module that holds trainable parameters of its own (an LM's LUT layers: latent weights, tables, scales) is
sharded over the ranks, so parameters, gradients and AdamW state of those take 1/N of the memory on each rank;
frozen parameters (an LM's embeddings, norms and head) are left as they are on every rank. Training states are
written as full, unsharded state dicts by rank 0 (the same files as one process writes, optimizer state keyed
by parameter name), gathered with ``torch.distributed.checkpoint.state_dict``, and read back by every rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from qatkit.train.distributed import current

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: nn.Module, device: str = "cpu") -> int:
    """Shard every module with trainable parameters of its own across the process group; returns how many."""
    info = current()
    mesh = init_device_mesh("cuda" if str(device).startswith("cuda") else "cpu", (info.world,))
    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    for m in owners:
        fully_shard(m, mesh=mesh, reshard_after_forward=True)
    return len(owners)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on rank 0 (empty on the others); every rank must call it."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state keyed by parameter name, on rank 0; every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Every rank loads a full state dict into its shards."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_float(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (e.g. a gradient norm over sharded gradients) as a Python float."""
    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t
