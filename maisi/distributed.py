"""torchrun support: who am I, split the work, gather results. One process works without any of it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from maisi.errors import InputError

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


def init_from_env(
    device: torch.device, backend: str | None = None, timeout: timedelta | None = None
) -> Ranks:
    """Join the process group torchrun describes; a no-op for one process.

    Args:
        device: the configured device; on CUDA each rank takes the GPU of its local rank.
        backend: None: gloo on CPU, NCCL on CUDA (training's tensor collectives). 'gloo' for jobs that only
            exchange small Python objects (generation), whatever the device.
        timeout: how long a collective waits for the slowest rank (None: torch's default, 30 min for gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        chosen = backend or ("nccl" if device.type == "cuda" else "gloo")
        extra = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(chosen, **extra)
    return ranks


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if ranks.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


def first_error(message: str | None, ranks: Ranks) -> str | None:
    """The message of the lowest rank that had one, on every rank (None when no rank had one).

    Lets every rank stop with the same bad-input error when a check failed on any one of them, instead of
    the others waiting forever at the next collective.
    """
    return next((m for m in gather(message, ranks) if m is not None), None)


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


def finish(ranks: Ranks) -> None:
    if ranks.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def agreed(ranks: Ranks, step: Callable[[], T]) -> T:
    """Run a step of checks on every rank; when it raised InputError on any rank, raise it on every rank
    (the lowest rank's message), so that all stop with exit code 2 and none waits for the others."""
    if ranks.world_size == 1:
        return step()
    result, message = None, None
    try:
        result = step()
    except InputError as e:
        message = str(e)
    first = first_error(message, ranks)
    if first is not None:
        raise InputError(first)
    return result  # type: ignore[return-value]
