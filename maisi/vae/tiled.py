"""Exact VAE decoding and encoding in tiles, with bounded memory on the compute device.

The result equals one whole-volume pass of MONAI's ``AutoencoderKlMaisi`` up to float summation order.
This module is the streaming engine and knows nothing of MONAI's classes: :mod:`maisi.vae.monai_adapter`
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
* optionally (``stream_levels``) the layers of each level from the first upsampling on (the larger
  volumes) are never stored whole, only each level's output: their convolutions run interleaved along x,
  each pulling rows of its input from the one before as it needs them, so each intermediate holds a few
  rows. A GroupNorm among them needs its input's statistics before its first row: one pass of the level's
  layers before it, keeping only the statistics, precedes the pass that makes the level's output (MAISI's
  mask VAE: 7 extra passes, about 2x the CPU time of storing them).

Attention blocks are global and cannot be tiled; a VAE with them, or with any module the adapter does not
know, is refused with :class:`UnsupportedStructure` (the released VAE has none); :mod:`maisi.vae.codec` then
falls back to the whole-volume pass with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from maisi.progress import progress_bar
from maisi.vae import monai_adapter as adapter
from maisi.vae.monai_adapter import Part, Step, UnsupportedStructure
from maisi.vae.storage import Shape3, Stats, TilingTrace, Volume

# Applied to every output tile of the last convolution, (N, C, tx, ty, tz) -> (N, C', tx, ty, tz): the result
# is assembled from the reduced tiles, so the whole output (e.g. 125-channel mask logits) never exists.
TileReduce = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_BUDGET_BYTES = 1 << 30
MIN_SLABS = 8  # slabs along x per volume, so that a consumed input is freed while the next one grows
# Order in which tile extents shrink to fit a budget: x-slabs down to 2 voxels (1-voxel slabs and small
# cubes convolve 3-10x slower than the whole volume), then y, then z.
_SHRINK_ORDER = ((0, 2), (1, 8), (2, 8), (0, 1), (1, 1), (2, 1))


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


def _plan_tile(
    step: Step, out_size: Shape3, batch: int, budget: int | None, voxels: int | None, x_max: int | None = None
) -> Shape3:
    """Largest tile (thin x-slabs first, then split in y, then z) whose estimated bytes and voxels fit."""
    tile = [min(math.ceil(out_size[0] / MIN_SLABS), x_max or out_size[0]), out_size[1], out_size[2]]
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

    def new(self, shape: tuple[int, ...], slab: int) -> Volume:
        pin = self.storage.type == "cpu" and self.device.type == "cuda"
        return Volume(shape, slab, self.storage, self.storage_dtype, pin=pin, trace=self.trace)


class _Stream:
    """One convolution streamed over its output tiles, row by row along x (a row: the tiles sharing an x
    range), into its output volume (``reduce``: the reduced tiles) and, for ``res_a``, the shortcut.

    Run whole (:meth:`finish`) when its input is stored, or lazily (:meth:`advance`) as the consumer of its
    output reaches further along x; then its input is produced lazily too, by ``source``, and the GroupNorm
    statistics of that input (``stats``) come from an earlier pass.
    """

    def __init__(
        self,
        step: Step,
        src: Volume,
        tile: Shape3,
        run: _Run,
        *,
        consume: bool,
        residual: Volume | None = None,
        slab: int | None = None,
        reduce: TileReduce | None = None,
        stats: Stats | None = None,
        source: _Stream | None = None,
    ) -> None:
        self.step, self.src, self.run, self.consume = step, src, run, consume
        self.residual, self.reduce, self.slab, self.source = residual, reduce, slab or tile[0], source
        self.in_size = src.shape[2:]
        out_shape = (src.shape[0], step.conv.out_channels, *(step.out_size(s) for s in self.in_size))
        self.out: Volume | None = None  # with reduce: allocated at the first tile, whose channels it knows
        self.stats = Stats()  # of the output (a streamed level keeps them for its next pass)
        self.track = reduce is None  # False: statistics no GroupNorm reads (saves a reduction per tile)
        if reduce is None:
            in_place = residual is not None and not residual.read_only
            self.out = residual if in_place else run.new(out_shape, self.slab)  # type: ignore[assignment]
            # an in-place residual sum overwrites the residual; its statistics are spent. Per stream: in a
            # lazy chain the residual's own producer may still be writing (other rows) into the volume
            self.out.stats = self.stats
        self.short = run.new(out_shape, tile[0]) if step.shortcut is not None else None
        self.dtype = step.read_dtype(src.stored_dtype)
        self.params = None
        if step.norm is not None:
            groups = (stats or src.stats).groups(step.norm.num_groups)
            self.params = adapter.norm_params(step, *groups, run.device)
        self.out_shape = out_shape
        starts = [range(0, size, t) for size, t in zip(out_shape[2:], tile)]
        self.rows = [
            [
                ((x, y, z), tuple(min(a + t, s) for a, t, s in zip((x, y, z), tile, out_shape[2:])))
                for y in starts[1]
                for z in starts[2]
            ]
            for x in starts[0]
        ]
        self.next_row, self.done = 0, 0  # output rows below x = done are complete
        run.trace.steps.append((step.name, tile, len(self.rows) * len(self.rows[0])))

    def advance(self, x: int) -> None:
        """Compute rows until the output below ``x`` is complete."""
        while self.done < x and self.next_row < len(self.rows):
            row = self.rows[self.next_row]
            for lo, hi in row:
                self._tile(lo, hi)
            self.next_row += 1
            self.done = row[0][1][0]
            if self.consume:  # free what no later row reads
                size = self.in_size[0]
                if self.next_row < len(self.rows):
                    (lo, hi) = self.rows[self.next_row][0]
                    size = self.step.source_box(lo[0], hi[0], size)[0]
                self.src.free_below(size)

    def finish(self) -> tuple[Volume, Volume | None]:
        self.advance(self.out_shape[2])
        assert self.out is not None
        return self.out, self.short

    def _tile(self, lo: Shape3, hi: Shape3) -> None:
        step, run, in_size = self.step, self.run, self.in_size
        box = [step.source_box(a, b, s) for a, b, s in zip(lo, hi, in_size)]
        if self.source is not None:  # it also writes the residual (its shortcut, or its own input)
            self.source.advance(min(box[0][1], in_size[0]))
        buf, inside = self.src.read(box, run.device, self.dtype)
        held = buf.nbytes
        whole = (slice(None), slice(None))
        if step.upsample:
            region = adapter.normalise(buf, inside, step, self.params) if self.params is not None else buf
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
                self.short is not None
            ):  # the ResBlock's 1x1 shortcut reads the un-normalised core of the input
                core = tuple(slice(a - b[0], c - b[0]) for a, c, b in zip(lo, hi, box))
                s_tile = adapter.conv(step.shortcut, buf[(*whole, *core)])  # type: ignore[arg-type]
                # no statistics: the residual sum overwrites it, lazily under the sum's own ones
                self.short.write(lo, s_tile, None)
                held += s_tile.nbytes
                del s_tile
            if self.params is not None:
                buf = adapter.normalise(buf, inside, step, self.params)
        if step.transposed:
            y = adapter.conv_transposed(step, buf, lo, hi, box)
        else:
            y = adapter.conv(step.conv, buf)
        held += y.nbytes
        del buf
        if self.residual is not None:
            res, _ = self.residual.read(list(zip(lo, hi)), run.device, y.dtype)
            y = res.add_(y)  # MONAI: out = x + h
            held += res.nbytes
        if self.reduce is not None:
            y = self.reduce(y)
            if self.out is None:  # the result as computed (e.g. uint8 labels), never the storage dtype
                shape = (*y.shape[:2], *self.out_shape[2:])
                self.out = Volume(shape, self.slab, run.storage, None, trace=run.trace)
        self.out.write(lo, y, self.stats if self.track else None)  # type: ignore[union-attr]
        run.trace.max_tile_bytes = max(run.trace.max_tile_bytes, held)
        run.trace.num_tiles += 1
        run.bar.update()


def plan_tiles(
    autoencoder: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    part: Part = "decoder",
    memory_budget_bytes: int | None = None,
    max_tile_voxels: int | None = None,
    stream_levels: bool = False,
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
        stream_levels: plan the decoder's levels from the first upsampling on as :func:`decode_tiled` streams
            them (rows thin enough that the rows they hold fit the budget too).

    Returns:
        One :class:`StepPlan` per convolution, in execution order.

    Raises:
        UnsupportedStructure: a module the adapter does not know (a ValueError naming it).
        ValueError: a non-positive limit, or a budget below one voxel of some layer.
    """
    steps = _program(autoencoder, part)
    plans = _plans(
        steps, input_shape, memory_budget_bytes, max_tile_voxels, stream_levels and part == "decoder"
    )
    return [plan for _, plan in plans]


def _program(autoencoder: torch.nn.Module, part: str) -> list[Step]:
    if part not in ("decoder", "encoder"):
        raise ValueError(f"part must be 'decoder' or 'encoder', got {part!r}")
    reason = adapter.check_structure(autoencoder, part)  # type: ignore[arg-type]
    if reason is not None:
        raise UnsupportedStructure(reason)
    return adapter.program(autoencoder, part)  # type: ignore[arg-type]


def _plans(
    steps: list[Step],
    input_shape: tuple[int, ...],
    budget: int | None,
    voxels: int | None,
    stream_levels: bool,
):
    for label, value in (("memory_budget_bytes", budget), ("max_tile_voxels", voxels)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    size = tuple(input_shape[2:])
    levels = dict(_levels(steps)) if stream_levels else {}
    streamed: dict[int, Shape3] = {}  # step index -> tile, for the streamed levels
    for i, step in enumerate(steps):
        out = tuple(step.out_size(s) for s in size)
        if i in levels:
            level_tiles = _plan_level(steps[i : levels[i]], out, input_shape[0], budget, voxels)  # type: ignore[arg-type]
            streamed.update(zip(range(i, levels[i]), level_tiles))
        if i in streamed:
            tile = streamed[i]
        else:
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
    stream_levels: bool = False


def _levels(steps: list[Step]) -> list[tuple[int, int]]:
    """The levels a streamed run streams, as step ranges [a, b): each upsampling step and the layers after
    it at the same resolution (the larger ones; those before the first upsampling are stored)."""
    starts = [i for i, s in enumerate(steps) if s.upsample or s.transposed]
    return list(zip(starts, [*starts[1:], len(steps)]))


def _row_bytes(tail: list[Step], plane: int, batch: int) -> int:
    """Bytes of one voxel-thick x-row of every volume a streamed level holds in part: each intermediate
    output and shortcut (an in-place residual sum adds none; float32)."""
    held = [
        s.conv.out_channels * (2 if s.shortcut is not None else 1) for s in tail[:-1] if s.role != "res_b"
    ]
    return 4 * batch * plane * sum(held)


def _plan_level(
    tail: list[Step], out_size: Shape3, batch: int, budget: int | None, voxels: int | None
) -> list[Shape3]:
    """Tiles of a streamed level: the thickest x-rows such that the rows the intermediates hold (about
    three per volume: the consumer's window with its halo, and the producer's next row) plus a whole-plane
    tile of every step fit the budget; below 3 voxels, tiles split in y and z instead."""
    thick = math.ceil(out_size[0] / MIN_SLABS)
    while True:
        rest = (
            None
            if budget is None
            else budget - 3 * thick * _row_bytes(tail, out_size[1] * out_size[2], batch)
        )
        if rest is not None and rest < 1 and thick == 1:
            raise ValueError(
                f"memory_budget_bytes {budget} is below the rows the streamed layers hold "
                f"({3 * _row_bytes(tail, out_size[1] * out_size[2], batch)} bytes); raise it"
            )
        if rest is None or rest >= 1:
            tiles = [_plan_tile(step, out_size, batch, rest, voxels, x_max=thick) for step in tail]
            if thick <= 2 or all(t[0] == thick for t in tiles):
                return tiles
        thick = math.ceil(out_size[0] / math.ceil(out_size[0] / (thick - 1)))


def _chain(
    tail: list[Step],
    tiles: list[Shape3],
    src: Volume,
    run: _Run,
    stats: dict[int, Stats],
    *,
    final: bool = False,
    result: bool = False,
    reduce: TileReduce | None = None,
) -> _Stream:
    """The level's steps as lazy streams, each pulling its input from the one before; returns the last.
    ``final``: the pass that makes the level's output, stored whole (it consumes ``src``), else a statistics
    pass for the last output; ``result``: that output is the decoder's."""
    stream: _Stream | None = None
    cur, residual = src, None
    for k, step in enumerate(tail):
        last = k + 1 == len(tail)
        # src is read by every pass; a ResBlock's input is kept for its residual unless the 1x1 shortcut
        # replaces it or the chain ends before the residual sum
        consume = (final or k > 0) and (step.role != "res_a" or step.shortcut is not None or last)
        lazy = {"stats": stats.get(k), "source": stream, "consume": consume}
        if step.role == "res_a":
            stream = _Stream(step, cur, tiles[k], run, **lazy)  # type: ignore[arg-type]
            residual = stream.short if stream.short is not None else cur
        else:
            whole = last and final and result  # the result is returned as one tensor
            stream = _Stream(
                step,
                cur,
                tiles[k],
                run,
                residual=residual,
                slab=step.out_size(cur.shape[2]) if whole else None,
                reduce=reduce if last else None,
                **lazy,  # type: ignore[arg-type]
            )
            residual = None
        cur = stream.out  # type: ignore[assignment]
        # only the last output's statistics are read: by the next pass or the next level
        stream.track = last and not (final and result)
    assert stream is not None
    return stream


def _run_level(
    tail: list[Step], tiles: list[Shape3], src: Volume, run: _Run, reduce: TileReduce | None, result: bool
) -> Volume:
    """Run a level from the stored ``src`` with its steps interleaved along x, so that only the level's
    output is stored whole. A GroupNorm needs the whole-volume statistics of its input before its first
    tile: for each one, a pass of the steps before it that keeps only those statistics (the recomputation
    is the price of the memory)."""
    stats: dict[int, Stats] = {}
    for k in range(1, len(tail)):
        if tail[k].norm is None:
            continue
        sink = _chain(tail[:k], tiles, src, run, stats)
        while sink.next_row < len(sink.rows):
            sink.advance(sink.done + 1)
            for volume in (sink.out, sink.short):
                if volume is not None:
                    volume.free_below(sink.done)
        stats[k] = sink.stats
    return _chain(tail, tiles, src, run, stats, final=True, result=result, reduce=reduce).finish()[0]


def _level_tiles(steps: list[Step], tiles: list[Shape3], sizes: list[Shape3]) -> int:
    """Tiles a streamed level computes over all its passes."""
    per_step = [math.prod(math.ceil(o / t) for o, t in zip(s, tile)) for s, tile in zip(sizes, tiles)]
    passes = [k for k in range(1, len(steps)) if steps[k].norm is not None] + [len(steps)]
    return sum(sum(per_step[:k]) for k in passes)


def _execute(
    part: str, steps: list[Step], x: torch.Tensor, device: torch.device, opts: _Options
) -> torch.Tensor:
    """Stream ``steps`` over ``x`` on ``device``; the result is one tensor on the storage device."""
    budget = DEFAULT_BUDGET_BYTES if opts.budget is None and opts.voxels is None else opts.budget
    plans = list(_plans(steps, tuple(x.shape), budget, opts.voxels, opts.stream_levels))
    levels = _levels(steps) if opts.stream_levels else []
    stored = plans[: levels[0][0]] if levels else plans
    total = sum(math.prod(math.ceil(o / t) for o, t in zip(p.out_shape, p.tile)) for _, p in stored)
    for a, b in levels:
        total += _level_tiles(
            steps[a:b], [p.tile for _, p in plans[a:b]], [p.out_shape for _, p in plans[a:b]]
        )
    with progress_bar(total=total, enabled=opts.progress, desc=f"tiled {part}", leave=False) as bar:
        storage = torch.device(opts.storage_device or "cpu")
        run = _Run(device, storage, opts.storage_dtype, opts.trace or TilingTrace(), bar)
        cur, residual = Volume.wrap(x), None
        for i, (step, plan) in enumerate(stored):
            slab = plan.out_shape[0] if i + 1 == len(plans) else None  # the result is returned as one tensor
            if step.role == "res_a":  # keep x for the residual unless the 1x1 shortcut replaces it here
                x_in = cur
                stream = _Stream(step, x_in, plan.tile, run, consume=step.shortcut is not None)
                cur, short = stream.finish()
                residual = short if short is not None else x_in
                del x_in
            else:
                reduce = opts.reduce if i + 1 == len(plans) else None
                stream = _Stream(
                    step, cur, plan.tile, run, consume=True, residual=residual, slab=slab, reduce=reduce
                )
                cur, _ = stream.finish()
                residual = None
            del stream
        for a, b in levels:
            last = b == len(steps)
            tiles = [p.tile for _, p in plans[a:b]]
            cur = _run_level(steps[a:b], tiles, cur, run, opts.reduce if last else None, last)
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
    stream_levels: bool = False,
) -> torch.Tensor:
    """Decode latents tile by tile; equals ``autoencoder.decode_stage_2_outputs(z)`` up to float rounding.

    MONAI's own ``decode`` runs, with its decoder streamed in tiles (see :mod:`maisi.vae.monai_adapter`).

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
        stream_levels: store only the output of each level from the first upsampling on (the largest
            volumes): its layers run interleaved along x from the level's stored input, each holding a few
            rows, with one extra pass of the layers before each of their GroupNorms for its statistics.
            Exact as well; slower (MAISI's mask VAE: some convolutions run up to 5 times, ~2x CPU time).

    Returns:
        (N, C_out, fx, fy, fz) images on ``storage_device``, in the dtype of the last convolution (with
        ``tile_reduce``: (N, C', fx, fy, fz) in the reduced dtype).

    Raises:
        UnsupportedStructure: the decoder is not built the way the adapter knows (check first with
            :func:`maisi.vae.monai_adapter.check_structure`).
    """
    device = next(autoencoder.parameters()).device
    steps = _program(autoencoder, "decoder")
    opts = _Options(
        memory_budget_bytes,
        max_tile_voxels,
        storage_device,
        storage_dtype,
        trace,
        progress,
        tile_reduce,
        stream_levels,
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
