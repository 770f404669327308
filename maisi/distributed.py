"""torchrun support: who am I, split the work, gather results. One process works without any of it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world_size`` processes launched by torchrun (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """Every ``world_size``-th item starting at ``rank``: disjoint shares covering all items."""
        return list(items[self.rank :: self.world_size])

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank; CPU stays CPU."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device


def init_from_env(device: torch.device) -> Ranks:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if ranks.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


def finish(ranks: Ranks) -> None:
    if ranks.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
