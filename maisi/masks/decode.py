"""Mask latents -> label volumes without the whole class logits: tiled decoding with a per-tile argmax.

MAISI decodes a generated mask latent with MONAI's sliding window to the full logits (125 channels: 8.4 GB in
float32 at 256^3), then softmax and argmax. Softmax is monotone per voxel, so the argmax of the logits is the
argmax of the softmax; we take it per tile of the tiled decoder's last convolution
(:func:`maisi.vae.tiled.decode_tiled` with ``tile_reduce``), so only one tile of logits ever exists. The
upsampled layers before it (64 channels at 256^3: 4.3 GB each) are streamed row by row too
(``stream_levels``), so a 64^3 latent decodes in under 2 GB.

Ties: ``torch.argmax`` keeps the lowest channel index among equal maxima, on the tile as on the whole
volume, so the labels equal ``torch.argmax`` of the untiled logits wherever the tiled logits equal them (they
do up to float summation order; ``tests/masks/test_mask_decode.py`` checks exact label equality).

A VAE whose structure the tiled path does not know is decoded with MONAI's ``SlidingWindowInferer`` over the
full logits (MAISI's way), with one :class:`maisi.vae.codec.TilingFallbackWarning`.
"""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path

import torch

from maisi.device import autocast
from maisi.errors import InputError
from maisi.resources import load_json
from maisi.vae.codec import TilingFallbackWarning, decode
from maisi.vae.monai_adapter import check_structure
from maisi.vae.tiled import decode_tiled

CHANNEL_TO_ID_FILE = "maisi_label_dict_124_to_132.json"


def _label_dtype(num_channels: int) -> torch.dtype:
    return torch.uint8 if num_channels <= 256 else torch.int16


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, x, y, z) logits -> (N, 1, x, y, z) channel index of the maximum (lowest index on ties), in
    uint8 for up to 256 channels."""
    return torch.argmax(logits, dim=1, keepdim=True).to(_label_dtype(logits.shape[1]))


@torch.no_grad()
def decode_mask_labels(
    autoencoder: torch.nn.Module,
    latent: torch.Tensor,
    scale_factor: float,
    *,
    memory_budget_bytes: int | None = None,
    roi_size: tuple[int, int, int] = (96, 96, 96),
    overlap: float = 0.6667,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    stream_levels: bool = True,
) -> torch.Tensor:
    """Decode a mask latent to class-channel indices; the full class logits never exist.

    Args:
        autoencoder: the mask VAE (``AutoencoderKlMaisi``, C output channels), on the compute device.
        latent: (N, 4, x, y, z) latent in the diffusion (scaled) space; divided by ``scale_factor`` first.
        scale_factor: the mask UNet checkpoint's ``scale_factor``.
        memory_budget_bytes: bound on one tile's working memory on the compute device (default 1 GiB).
        roi_size, overlap: the sliding window of the fallback (latent voxels; MAISI's defaults).
        autocast_dtype: half-precision dtype, or None for float32.
        progress: progress bar over the tiles.
        stream_levels: store only each upsampled level's output (``stream_levels`` of
            :func:`maisi.vae.tiled.decode_tiled`): a 64^3 latent then decodes in under 2 GB, at the price
            of recomputing layers for their GroupNorm statistics; False stores every layer (faster, more
            memory: 64 channels x 256^3 = 4.3 GB for one).

    Returns:
        (N, 1, fx, fy, fz) channel indices on the CPU, uint8 (int16 beyond 256 channels); map them to MAISI
        ids with :func:`channels_to_maisi_ids`.
    """
    z = latent / scale_factor
    reason = check_structure(autoencoder, "decoder")
    with autocast(latent.device, autocast_dtype):
        if reason is None:
            labels = decode_tiled(
                autoencoder,
                z,
                memory_budget_bytes=memory_budget_bytes,
                tile_reduce=argmax_labels,
                progress=progress,
                stream_levels=stream_levels,
            )
            return labels.cpu()
    warnings.warn(
        f"tiled mask decoding does not recognise this model ({reason}); decoding the full logits with "
        "MONAI's sliding window instead: labels may differ at window seams, memory grows with the classes",
        TilingFallbackWarning,
        stacklevel=3,  # the caller, past torch.no_grad's wrapper
    )
    logits = decode(
        autoencoder,
        latent,
        scale_factor,
        method="sliding_window",
        roi_size=roi_size,
        overlap=overlap,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    return argmax_labels(logits)


@cache
def _packaged_table() -> tuple[int, ...]:
    return tuple(_table_from(load_json(CHANNEL_TO_ID_FILE), CHANNEL_TO_ID_FILE))


def _table_from(mapping: dict, source: str) -> list[int]:
    """``{name: [channel, maisi_id]}`` -> the MAISI id of every channel 0..C-1 (each channel exactly once)."""
    pairs = {}
    for name, value in mapping.items():
        ok = isinstance(value, list) and len(value) == 2 and all(type(v) is int and v >= 0 for v in value)
        if not ok:
            raise InputError(f"{source}: '{name}' is {value!r}, expected [channel index, MAISI id]")
        if value[0] in pairs:
            raise InputError(
                f"{source}: channel {value[0]} is given twice ('{pairs[value[0]][0]}', '{name}')"
            )
        pairs[value[0]] = (name, value[1])
    missing = sorted(set(range(len(pairs))) - set(pairs))
    if missing:
        raise InputError(f"{source}: channels {missing[:5]} have no entry (expected 0..{len(pairs) - 1})")
    return [pairs[c][1] for c in range(len(pairs))]


def channel_to_id_table(path: str | Path | None = None) -> torch.Tensor:
    """Lookup table channel index -> MAISI id (int64, one entry per decoder channel).

    Args:
        path: a ``{name: [channel, id]}`` JSON file; default MAISI's ``label_dict_124_to_132.json`` (125
            channels), packaged in ``maisi/resources``.

    Raises:
        InputError: an entry that is not ``[channel, id]``, a channel given twice or missing.
    """
    if path is None:
        return torch.tensor(_packaged_table(), dtype=torch.int64)
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the channel -> id table ({err})") from None
    if not isinstance(mapping, dict):
        raise InputError(f"{path}: expected an object {{name: [channel, MAISI id]}}")
    return torch.tensor(_table_from(mapping, str(path)), dtype=torch.int64)


def channels_to_maisi_ids(channels: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Map channel indices to MAISI ids with one vectorised lookup.

    Args:
        channels: integer tensor of channel indices, any shape.
        table: from :func:`channel_to_id_table` (default MAISI's 125-channel table).

    Returns:
        The MAISI ids, same shape, int16 (ids go up to 200 and beyond 255 in v2 dictionaries).

    Raises:
        ValueError: a channel index outside the table (a VAE with more channels than the table).
    """
    table = channel_to_id_table() if table is None else table
    if channels.numel():
        low, high = int(channels.min()), int(channels.max())
        if low < 0 or high >= len(table):
            raise ValueError(
                f"channel index {high if high >= len(table) else low} outside 0..{len(table) - 1}"
            )
    return table.to(torch.int16)[channels.long()]
