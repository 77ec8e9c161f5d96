"""Distributed capture under torchrun: ranks, the process group, and the few collectives a run needs.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; blockcap then joins the process
group (NCCL on CUDA, gloo on CPU), puts rank r on ``cuda:LOCAL_RANK``, and shares the write units
among ranks. Rank 0 creates or checks the store before a barrier and finishes it after the ranks
agree. Without torchrun this is a group of one, and every collective is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False  # this process initialised the process group and must destroy it

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over ranks."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if not self.active:
            return value
        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if td.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.joined and td.is_initialized():
            td.destroy_process_group()


def from_env() -> Group:
    """The torchrun group this process belongs to, joined; a group of one without torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Group()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world == 1:
        return Group(rank, world, local)
    joined = False
    if not td.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        td.init_process_group(backend="nccl" if cuda else "gloo")
        joined = True
    return Group(rank, world, local, joined)
