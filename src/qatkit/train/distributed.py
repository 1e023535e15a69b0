"""Multi-process training under torchrun: process-group set-up and a batch sampler shared by all ranks.

Every rank sees the same global batches in the same order (a permutation seeded by seed and epoch) and takes
its own slice of each, so N processes with per-rank batch B/N follow the same trajectory as one process
with batch B, and a resumed run can skip the batches an epoch already used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU); else 1 rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def current() -> DistInfo:
    """The process group already joined (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def barrier() -> None:
    if current().active:
        dist.barrier()


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (keeps control flow identical across ranks)."""
    info = current()
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(obj):
    """Rank 0's ``obj`` on every rank (so decisions taken from it are the same everywhere)."""
    if not current().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlobalBatchSampler(Sampler[list[int]]):
    """Index batches for one rank: global batch ``i`` of epoch ``e`` is the same set on every rank and in
    every run with the same seed; rank ``r`` of ``w`` gets positions ``r, r + w, ...`` of it."""

    def __init__(self, n: int, batch_size: int, seed: int, info: DistInfo = DistInfo()):
        self.n, self.batch_size, self.seed, self.info = n, batch_size, seed, info
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Serve ``epoch``'s batches from number ``skip`` on (to resume mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[torch.Tensor]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return list(order.split(self.batch_size))

    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        for b in self.global_batches()[self.skip :]:
            if len(b) >= self.info.world:  # a last batch too small to give every rank a sample is dropped
                yield b[self.info.rank :: self.info.world].tolist()

    def __len__(self) -> int:
        return self.num_batches() - self.skip
