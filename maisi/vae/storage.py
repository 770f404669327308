"""Whole-volume storage of the tiled VAE engine (:mod:`maisi.vae.tiled`): volumes kept as slabs along x,
freed as they are consumed, and GroupNorm statistics merged tile by tile."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Shape3 = tuple[int, int, int]


@dataclass
class TilingTrace:
    """What a tiled run did: the largest sum of tile tensors alive at once on the compute device (input
    with halo, upsampled copy, output, residual or shortcut; measured on the tensors), the number of tiles,
    and per step (name, output tile, number of tiles; a streamed tail lists its steps once per pass), and
    the bytes stored whole-volume slabs take (the input latent not counted)."""

    max_tile_bytes: int = 0
    num_tiles: int = 0
    steps: list[tuple[str, Shape3, int]] = field(default_factory=list)
    # bytes of intermediate and result slabs alive on the storage device: now, and the most at once
    stored_bytes: int = 0
    max_stored_bytes: int = 0


class Stats:
    """Per-(sample, channel) count, mean and sum of squared deviations, merged tile by tile in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, torch.zeros(()), torch.zeros(())

    def add(self, tile: torch.Tensor) -> None:
        n = math.prod(tile.shape[2:])
        var, mean = torch.var_mean(tile.float(), dim=(2, 3, 4), unbiased=False)
        mean, m2 = mean.double(), var.double() * n  # on the tile's device: no synchronisation per tile
        total = self.count + n
        delta = mean - self.mean.to(mean.device)
        self.mean = self.mean.to(mean.device) + delta * (n / total)
        self.m2 = self.m2.to(mean.device) + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def groups(self, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance per (sample, group), as GroupNorm over the whole volume has them."""
        n, c = self.mean.shape
        mean = self.mean.view(n, num_groups, c // num_groups)
        group_mean = mean.mean(-1, keepdim=True)
        m2 = self.m2.view(n, num_groups, -1).sum(-1) + self.count * (mean - group_mean).square().sum(-1)
        return group_mean.squeeze(-1), m2 / (self.count * (c // num_groups))


class Volume:
    """A (N, C, X, Y, Z) tensor kept as slabs along x on the storage device, with running statistics."""

    def __init__(
        self,
        shape: tuple[int, ...],
        slab: int,
        device: torch.device,
        dtype: torch.dtype | None,
        pin: bool = False,
        read_only: bool = False,
        trace: TilingTrace | None = None,
    ) -> None:
        self.shape, self.device, self.dtype, self.pin, self.read_only = shape, device, dtype, pin, read_only
        self.trace = trace
        self.edges = [*range(0, shape[2], slab), shape[2]]
        self.slabs: list[torch.Tensor | None] = [None] * (len(self.edges) - 1)
        self.stats = Stats()  # those of its last writer (an in-place residual sum: the sum's)

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> Volume:
        volume = cls(tuple(tensor.shape), tensor.shape[2], tensor.device, tensor.dtype, read_only=True)
        volume.slabs[0] = tensor
        return volume

    @property
    def stored_dtype(self) -> torch.dtype:
        return next((s.dtype for s in self.slabs if s is not None), self.dtype or torch.float32)

    def _parts(self, lo: int, hi: int):
        for k, (a, b) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            if a < hi and lo < b:
                yield k, a, max(lo, a), min(hi, b)

    def read(
        self, box: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list]:
        """Region ``box`` (per axis [lo, hi), may leave the volume) on ``device``, zeros outside; and per
        axis the slice of the region that lies inside the volume."""
        inside = [(max(lo, 0), min(hi, size)) for (lo, hi), size in zip(box, self.shape[2:])]
        local = [slice(a - lo, b - lo) for (a, b), (lo, _) in zip(inside, box)]
        empty = torch.empty if inside == [tuple(b) for b in box] else torch.zeros
        out = empty(*self.shape[:2], *(hi - lo for lo, hi in box), device=device, dtype=dtype)
        (y0, y1), (z0, z1) = inside[1], inside[2]
        for k, a, lo, hi in self._parts(*inside[0]):
            slab = self.slabs[k]
            assert slab is not None, f"slab {k} read after it was freed"
            dst = out[:, :, lo - box[0][0] : hi - box[0][0], local[1], local[2]]
            dst.copy_(slab[:, :, lo - a : hi - a, y0:y1, z0:z1], non_blocking=True)
        return out, local

    def write(self, lo: Shape3, tile: torch.Tensor, stats: Stats | None) -> None:
        """Store ``tile`` at ``lo`` (allocating slabs on first use) and add it to ``stats``."""
        if stats is not None:
            stats.add(tile)
        (y0, z0), (y1, z1) = lo[1:], (lo[1] + tile.shape[3], lo[2] + tile.shape[4])
        for k, a, x0, x1 in self._parts(lo[0], lo[0] + tile.shape[2]):
            slab = self.slabs[k]
            if slab is None:
                shape = (*self.shape[:2], self.edges[k + 1] - a, *self.shape[3:])
                slab = self.slabs[k] = torch.empty(
                    shape, dtype=self.dtype or tile.dtype, device=self.device, pin_memory=self.pin
                )
                self._count(slab.nbytes)
            slab[:, :, x0 - a : x1 - a, y0:y1, z0:z1].copy_(tile[:, :, x0 - lo[0] : x1 - lo[0]])

    def free_below(self, x: int) -> None:
        """Drop the slabs that end at or before ``x`` (no later tile reads them)."""
        freed = [k for k, b in enumerate(self.edges[1:]) if b <= x and self.slabs[k] is not None]
        for k in freed:
            self._count(-self.slabs[k].nbytes)  # type: ignore[union-attr]
            self.slabs[k] = None
        # No glibc malloc_trim (ctypes) here, a trade-off rather than a clear win (2 cores, fresh processes):
        # it lowered the decode's added peak RSS by a median 13% (-1..33%, 10 pairs; ~23% for thin tiles)
        # and cost about 10% more CPU time. The <= 0.5x-of-one-pass memory target holds without it.

    def _count(self, nbytes: int) -> None:
        if self.trace is not None:
            self.trace.stored_bytes += nbytes
            self.trace.max_stored_bytes = max(self.trace.max_stored_bytes, self.trace.stored_bytes)

    def tensor(self) -> torch.Tensor:
        slabs = [s for s in self.slabs if s is not None]
        assert len(slabs) == len(self.slabs), "volume not complete"
        return slabs[0] if len(slabs) == 1 else torch.cat(slabs, dim=2)
