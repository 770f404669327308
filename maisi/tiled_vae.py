"""Exact VAE decoding and encoding in tiles, with bounded memory on the compute device.

The result equals one whole-volume pass of MONAI's ``AutoencoderKlMaisi`` up to float summation order.
This module is the streaming engine and knows nothing of MONAI's classes: :mod:`maisi.monai_vae_adapter`
turns the decoder (or encoder) into a chain of convolutions, each preceded by a GroupNorm (+ SiLU), a
trilinear x2 upsampling or nothing, and holds the arithmetic that must match MONAI's. We run one
convolution at a time:

* each convolution is streamed over output tiles. A tile reads its input with a halo as wide as the kernel
  reaches (1 voxel for 3x3x3, plus the source voxels trilinear upsampling reads), zero-filled only outside
  the volume, exactly where the whole-volume pass zero-pads. Every output is computed once: no overlap.
* each GroupNorm uses whole-volume statistics: per-channel mean and variance are merged (Chan's parallel
  formula, float64) while the previous convolution writes its tiles, so they cost no extra pass.
* whole-volume intermediates live on a storage device (the CPU; pinned when computing on a GPU) as slabs
  along x. A consumed input's slabs are freed once no later tile reads them, so a step holds about
  max(input, output) plus one tile, where MONAI's pass holds input, output and several temporaries.

Attention blocks are global and cannot be tiled; a VAE with them, or with any module the adapter does not
know, is refused with :class:`UnsupportedStructure` (the released VAE has none); :mod:`maisi.decoding` then
falls back to the whole-volume pass with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from maisi import monai_vae_adapter as adapter
from maisi.monai_vae_adapter import Part, Step, UnsupportedStructure

Shape3 = tuple[int, int, int]
# Applied to every output tile of the last convolution, (N, C, tx, ty, tz) -> (N, C', tx, ty, tz): the result
# is assembled from the reduced tiles, so the whole output (e.g. 125-channel mask logits) never exists.
TileReduce = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_BUDGET_BYTES = 1 << 30
MIN_SLABS = 8  # slabs along x per volume, so that a consumed input is freed while the next one grows
# Order in which tile extents shrink to fit a budget: x-slabs down to 2 voxels (1-voxel slabs and small
# cubes convolve 3-10x slower than the whole volume), then y, then z.
_SHRINK_ORDER = ((0, 2), (1, 8), (2, 8), (0, 1), (1, 1), (2, 1))


@dataclass
class TilingTrace:
    """What a tiled run did: the largest sum of tile tensors alive at once on the compute device (input
    with halo, upsampled copy, output, residual or shortcut; measured on the tensors), the number of tiles,
    and per step (name, output tile, number of tiles)."""

    max_tile_bytes: int = 0
    num_tiles: int = 0
    steps: list[tuple[str, Shape3, int]] = field(default_factory=list)


@dataclass(frozen=True)
class StepPlan:
    """How one convolution is streamed: its volumes (x, y, z), (in, out) channels, output tile and the
    estimated peak bytes of one tile on the compute device (float32). Edge tiles may be smaller."""

    name: str
    in_shape: Shape3
    out_shape: Shape3
    channels: tuple[int, int]
    tile: Shape3
    tile_bytes: int


class _Stats:
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


class _Volume:
    """A (N, C, X, Y, Z) tensor kept as slabs along x on the storage device, with running statistics."""

    def __init__(
        self,
        shape: tuple[int, ...],
        slab: int,
        device: torch.device,
        dtype: torch.dtype | None,
        pin: bool = False,
        read_only: bool = False,
    ) -> None:
        self.shape, self.device, self.dtype, self.pin, self.read_only = shape, device, dtype, pin, read_only
        self.edges = [*range(0, shape[2], slab), shape[2]]
        self.slabs: list[torch.Tensor | None] = [None] * (len(self.edges) - 1)
        self.stats = _Stats()

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> _Volume:
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

    def write(self, lo: Shape3, tile: torch.Tensor) -> None:
        """Store ``tile`` at ``lo`` (allocating slabs on first use) and add it to the statistics."""
        self.stats.add(tile)
        (y0, z0), (y1, z1) = lo[1:], (lo[1] + tile.shape[3], lo[2] + tile.shape[4])
        for k, a, x0, x1 in self._parts(lo[0], lo[0] + tile.shape[2]):
            slab = self.slabs[k]
            if slab is None:
                shape = (*self.shape[:2], self.edges[k + 1] - a, *self.shape[3:])
                slab = self.slabs[k] = torch.empty(
                    shape, dtype=self.dtype or tile.dtype, device=self.device, pin_memory=self.pin
                )
            slab[:, :, x0 - a : x1 - a, y0:y1, z0:z1].copy_(tile[:, :, x0 - lo[0] : x1 - lo[0]])

    def free_below(self, x: int) -> None:
        """Drop the slabs that end at or before ``x`` (no later tile reads them)."""
        freed = [k for k, b in enumerate(self.edges[1:]) if b <= x and self.slabs[k] is not None]
        for k in freed:
            self.slabs[k] = None
        # No glibc malloc_trim (ctypes) here, a trade-off rather than a clear win (2 cores, fresh processes):
        # it lowered the decode's added peak RSS by a median 13% (-1..33%, 10 pairs; ~23% for thin tiles)
        # and cost about 10% more CPU time. The <= 0.5x-of-one-pass memory target holds without it.

    def tensor(self) -> torch.Tensor:
        slabs = [s for s in self.slabs if s is not None]
        assert len(slabs) == len(self.slabs), "volume not complete"
        return slabs[0] if len(slabs) == 1 else torch.cat(slabs, dim=2)


def _tile_bytes(step: Step, tile: Shape3, batch: int) -> int:
    """Estimated peak bytes of one interior tile: the tensors :func:`_run_step` holds at once, plus one copy
    of input and output for the convolution backend's own layouts (oneDNN reorders)."""
    c_in, c_out = step.conv.in_channels, step.conv.out_channels
    conv_in = math.prod(b - a for a, b in (step.conv_box(0, t) for t in tile))
    out = math.prod(tile)
    total = 2 * conv_in * c_in + (3 if step.role == "res_b" or step.shortcut is not None else 2) * out * c_out
    if step.transposed:  # the uncropped output of the input region
        total += out * c_out
    if step.upsample:  # the source region and its x2 interpolation
        total += 9 * c_in * math.prod(b - a for a, b in (step.source_box(4, 4 + t, 1 << 30) for t in tile))
    return 4 * batch * total


def _plan_tile(step: Step, out_size: Shape3, batch: int, budget: int | None, voxels: int | None) -> Shape3:
    """Largest tile (thin x-slabs first, then split in y, then z) whose estimated bytes and voxels fit."""
    tile = [math.ceil(out_size[0] / MIN_SLABS), out_size[1], out_size[2]]
    while (voxels is not None and math.prod(tile) > voxels) or (
        budget is not None and _tile_bytes(step, tuple(tile), batch) > budget  # type: ignore[arg-type]
    ):
        axis = next((a for a, floor in _SHRINK_ORDER if tile[a] > floor), None)
        if axis is None:
            raise ValueError(
                f"memory_budget_bytes {budget} / max_tile_voxels {voxels} is below one voxel of "
                f"{step.name} ({_tile_bytes(step, (1, 1, 1), batch)} bytes); raise it"
            )
        # the largest extent below the current one that splits the axis evenly (no sliver as the last tile)
        tile[axis] = math.ceil(out_size[axis] / math.ceil(out_size[axis] / (tile[axis] - 1)))
    return tuple(tile)  # type: ignore[return-value]


@dataclass
class _Run:
    device: torch.device
    storage: torch.device
    storage_dtype: torch.dtype | None
    trace: TilingTrace
    bar: tqdm

    def new(self, shape: tuple[int, ...], slab: int) -> _Volume:
        pin = self.storage.type == "cpu" and self.device.type == "cuda"
        return _Volume(shape, slab, self.storage, self.storage_dtype, pin=pin)


def _run_step(
    step: Step,
    src: _Volume,
    tile: Shape3,
    run: _Run,
    *,
    consume: bool,
    residual: _Volume | None = None,
    slab: int | None = None,
    reduce: TileReduce | None = None,
) -> tuple[_Volume, _Volume | None]:
    """Stream one convolution over the volume; returns its output (``reduce``: the reduced tiles) and, for
    ``res_a``, the shortcut."""
    in_size, batch, c_out = src.shape[2:], src.shape[0], step.conv.out_channels
    out_shape = (batch, c_out, *(step.out_size(s) for s in in_size))
    out: _Volume | None = None  # with reduce: allocated at the first tile, whose channels it then knows
    if reduce is None:
        in_place = residual is not None and not residual.read_only
        out = residual if in_place else run.new(out_shape, slab or tile[0])  # type: ignore[assignment]
        out.stats = _Stats()  # an in-place residual sum overwrites the residual; its statistics are spent
    short = run.new(out_shape, tile[0]) if step.shortcut is not None else None
    dtype = step.read_dtype(src.stored_dtype)
    params = None
    if step.norm is not None:
        params = adapter.norm_params(step, *src.stats.groups(step.norm.num_groups), run.device)
    tiles = [
        (lo, tuple(min(a + t, s) for a, t, s in zip(lo, tile, out_shape[2:])))
        for lo in (
            (x, y, z)
            for x in range(0, out_shape[2], tile[0])
            for y in range(0, out_shape[3], tile[1])
            for z in range(0, out_shape[4], tile[2])
        )
    ]
    run.trace.steps.append((step.name, tile, len(tiles)))
    whole = (slice(None), slice(None))
    for i, (lo, hi) in enumerate(tiles):
        box = [step.source_box(a, b, s) for a, b, s in zip(lo, hi, in_size)]
        buf, inside = src.read(box, run.device, dtype)
        held = buf.nbytes
        if step.upsample:
            region = adapter.normalise(buf, inside, step, params) if params is not None else buf
            up = adapter.upsample(region)
            conv_box = [step.conv_box(a, b) for a, b in zip(lo, hi)]
            inner = [(max(a, 0), min(b, 2 * s)) for (a, b), s in zip(conv_box, in_size)]
            buf = torch.zeros(
                *buf.shape[:2], *(b - a for a, b in conv_box), dtype=up.dtype, device=run.device
            )
            dst = [slice(a - c[0], b - c[0]) for (a, b), c in zip(inner, conv_box)]
            buf[(*whole, *dst)] = up[
                (*whole, *(slice(a - 2 * s[0], b - 2 * s[0]) for (a, b), s in zip(inner, box)))
            ]
            held += up.nbytes + buf.nbytes
            del up, region
        else:
            if (
                short is not None
            ):  # the ResBlock's 1x1 shortcut reads the un-normalised core of the same input
                core = tuple(slice(a - b[0], c - b[0]) for a, c, b in zip(lo, hi, box))
                s_tile = adapter.conv(step.shortcut, buf[(*whole, *core)])  # type: ignore[arg-type]
                short.write(lo, s_tile)
                held += s_tile.nbytes
                del s_tile
            if params is not None:
                buf = adapter.normalise(buf, inside, step, params)
        if step.transposed:
            y = adapter.conv_transposed(step, buf, lo, hi, box)
        else:
            y = adapter.conv(step.conv, buf)
        held += y.nbytes
        del buf
        if residual is not None:
            res, _ = residual.read(list(zip(lo, hi)), run.device, y.dtype)
            y = res.add_(y)  # MONAI: out = x + h
            held += res.nbytes
        if reduce is not None:
            y = reduce(y)
            if out is None:  # the result as computed (e.g. uint8 labels), never the storage dtype
                out = _Volume((*y.shape[:2], *out_shape[2:]), slab or tile[0], run.storage, None)
        out.write(lo, y)
        run.trace.max_tile_bytes = max(run.trace.max_tile_bytes, held)
        run.trace.num_tiles += 1
        run.bar.update()
        if consume and i + 1 < len(tiles) and tiles[i + 1][0][0] != lo[0]:  # a row of tiles along x is done
            src.free_below(step.source_box(tiles[i + 1][0][0], tiles[i + 1][1][0], in_size[0])[0])
    assert out is not None
    return out, short


def plan_tiles(
    autoencoder: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    part: Part = "decoder",
    memory_budget_bytes: int | None = None,
    max_tile_voxels: int | None = None,
) -> list[StepPlan]:
    """Map a memory budget (or a tile size) to the output tile of every streamed convolution.

    Each convolution gets the largest tile whose estimated working set fits: x-slabs (at least
    ``MIN_SLABS`` per volume, so a consumed input is freed while its successor grows) down to 2 voxels,
    then splits in y and z: low-resolution layers get large tiles, full-resolution layers thin ones.

    Args:
        autoencoder: an ``AutoencoderKlMaisi`` without attention blocks.
        input_shape: (N, C, x, y, z) of the latent (``part="decoder"``) or the image (``"encoder"``).
        part: ``"decoder"`` or ``"encoder"``.
        memory_budget_bytes, max_tile_voxels: bounds on one tile's estimated bytes / output voxels.

    Returns:
        One :class:`StepPlan` per convolution, in execution order.

    Raises:
        UnsupportedStructure: a module the adapter does not know (a ValueError naming it).
        ValueError: a non-positive limit, or a budget below one voxel of some layer.
    """
    steps = _program(autoencoder, part)
    return [plan for _, plan in _plans(steps, input_shape, memory_budget_bytes, max_tile_voxels)]


def _program(autoencoder: torch.nn.Module, part: str) -> list[Step]:
    if part not in ("decoder", "encoder"):
        raise ValueError(f"part must be 'decoder' or 'encoder', got {part!r}")
    reason = adapter.check_structure(autoencoder, part)  # type: ignore[arg-type]
    if reason is not None:
        raise UnsupportedStructure(reason)
    return adapter.program(autoencoder, part)  # type: ignore[arg-type]


def _plans(steps: list[Step], input_shape: tuple[int, ...], budget: int | None, voxels: int | None):
    for label, value in (("memory_budget_bytes", budget), ("max_tile_voxels", voxels)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    size = tuple(input_shape[2:])
    for step in steps:
        out = tuple(step.out_size(s) for s in size)
        tile = _plan_tile(step, out, input_shape[0], budget, voxels)  # type: ignore[arg-type]
        channels = (step.conv.in_channels, step.conv.out_channels)
        tile_bytes = _tile_bytes(step, tile, input_shape[0])
        yield step, StepPlan(step.name, size, out, channels, tile, tile_bytes)  # type: ignore[arg-type]
        size = out


@dataclass(frozen=True)
class _Options:
    """How a tiled run bounds its memory and where it keeps its intermediates (see :func:`decode_tiled`)."""

    budget: int | None
    voxels: int | None
    storage_device: torch.device | str | None
    storage_dtype: torch.dtype | None
    trace: TilingTrace | None
    progress: bool
    reduce: TileReduce | None = None


def _execute(
    part: str, steps: list[Step], x: torch.Tensor, device: torch.device, opts: _Options
) -> torch.Tensor:
    """Stream ``steps`` over ``x`` on ``device``; the result is one tensor on the storage device."""
    budget = DEFAULT_BUDGET_BYTES if opts.budget is None and opts.voxels is None else opts.budget
    plans = list(_plans(steps, tuple(x.shape), budget, opts.voxels))
    total = sum(math.prod(math.ceil(o / t) for o, t in zip(p.out_shape, p.tile)) for _, p in plans)
    with tqdm(total=total, disable=not opts.progress, desc=f"tiled {part}", leave=False) as bar:
        storage = torch.device(opts.storage_device or "cpu")
        run = _Run(device, storage, opts.storage_dtype, opts.trace or TilingTrace(), bar)
        cur, residual = _Volume.wrap(x), None
        for i, (step, plan) in enumerate(plans):
            slab = plan.out_shape[0] if i + 1 == len(plans) else None  # the result is returned as one tensor
            if step.role == "res_a":  # keep x for the residual unless the 1x1 shortcut replaces it here
                x_in = cur
                cur, short = _run_step(step, x_in, plan.tile, run, consume=step.shortcut is not None)
                residual = short if short is not None else x_in
                del x_in
            else:
                reduce = opts.reduce if i + 1 == len(plans) else None
                cur, _ = _run_step(
                    step, cur, plan.tile, run, consume=True, residual=residual, slab=slab, reduce=reduce
                )
                residual = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return cur.tensor()


@torch.no_grad()
def decode_tiled(
    autoencoder: torch.nn.Module,
    z: torch.Tensor,
    *,
    memory_budget_bytes: int | None = None,
    max_tile_voxels: int | None = None,
    storage_device: torch.device | str | None = None,
    storage_dtype: torch.dtype | None = None,
    trace: TilingTrace | None = None,
    progress: bool = False,
    tile_reduce: TileReduce | None = None,
) -> torch.Tensor:
    """Decode latents tile by tile; equals ``autoencoder.decode_stage_2_outputs(z)`` up to float rounding.

    MONAI's own ``decode`` runs, with its decoder streamed in tiles (see :mod:`maisi.monai_vae_adapter`).

    Args:
        autoencoder: ``AutoencoderKlMaisi`` without attention blocks, on the compute device.
        z: (N, C_latent, x, y, z) latents, already divided by ``scale_factor``; any device.
        memory_budget_bytes: bound on one tile's working set on the compute device (see :func:`plan_tiles`);
            1 GiB when neither limit is given.
        max_tile_voxels: bound on the output voxels of one tile.
        storage_device: where whole-volume intermediates and the result live; default the CPU (pinned
            memory when computing on a GPU), so the GPU holds only the weights and one tile.
        storage_dtype: dtype of the stored intermediates; default as computed (float32, or float16 under
            autocast). A narrower one saves host memory but is no longer exact.
        trace: filled with what was actually processed (largest tile in bytes, tiles per step).
        progress: progress bar over the tiles.
        tile_reduce: applied to each output tile of the last convolution, (N, C_out, tx, ty, tz) ->
            (N, C', tx, ty, tz) (e.g. an argmax over class logits); the result is assembled from the reduced
            tiles, in their dtype, so the whole C_out-channel output never exists.

    Returns:
        (N, C_out, fx, fy, fz) images on ``storage_device``, in the dtype of the last convolution (with
        ``tile_reduce``: (N, C', fx, fy, fz) in the reduced dtype).

    Raises:
        UnsupportedStructure: the decoder is not built the way the adapter knows (check first with
            :func:`maisi.monai_vae_adapter.check_structure`).
    """
    device = next(autoencoder.parameters()).device
    steps = _program(autoencoder, "decoder")
    opts = _Options(
        memory_budget_bytes, max_tile_voxels, storage_device, storage_dtype, trace, progress, tile_reduce
    )

    def decoder(h: torch.Tensor) -> torch.Tensor:
        return _execute("decoder", steps, h, device, opts)

    return adapter.run_decode(autoencoder, z.to(device), decoder)


@torch.no_grad()
def encode_tiled(
    autoencoder: torch.nn.Module,
    images: torch.Tensor,
    *,
    memory_budget_bytes: int | None = None,
    max_tile_voxels: int | None = None,
    storage_device: torch.device | str | None = None,
    storage_dtype: torch.dtype | None = None,
    trace: TilingTrace | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode images tile by tile; equals ``autoencoder.encode(images)`` up to float rounding.

    MONAI's own ``encode`` runs (posterior and clamp included), with its encoder streamed in tiles.

    Args:
        autoencoder: ``AutoencoderKlMaisi`` without attention blocks, on the compute device.
        images: (N, C_in, X, Y, Z) intensities, sizes multiples of the VAE factor; any device (tiles are
            copied from there to the compute device).
        memory_budget_bytes, max_tile_voxels, storage_device, storage_dtype, trace, progress: as in
            :func:`decode_tiled`.

    Returns:
        ``(z_mu, z_sigma)``, each (N, C_latent, X/f, Y/f, Z/f), on the compute device.

    Raises:
        UnsupportedStructure: as in :func:`decode_tiled`.
    """
    device = next(autoencoder.parameters()).device
    steps = _program(autoencoder, "encoder")
    opts = _Options(memory_budget_bytes, max_tile_voxels, storage_device, storage_dtype, trace, progress)

    def encoder(x: torch.Tensor) -> torch.Tensor:
        return _execute("encoder", steps, x, device, opts).to(
            device
        )  # the posterior runs where the weights are

    return adapter.run_encode(autoencoder, images, encoder)


__all__ = [
    "StepPlan",
    "TileReduce",
    "TilingTrace",
    "UnsupportedStructure",
    "decode_tiled",
    "encode_tiled",
    "plan_tiles",
]
