"""Load the networks of an LDM preset strictly, and resolve the scale factor its latents are decoded with.

A weights file is one of:

- our checkpoint (:mod:`maisi.checkpoints`: weights, the network's arguments, ``scale_factor``,
  provenance), checked against the preset's arguments and loaded with ``strict=True``;
- a released bundle's plain state dict in the old GenerativeModels layout (``generative-0.x``), converted
  strictly by :mod:`maisi.families.legacy_weights`;
- a plain state dict in MONAI's own layout (its keys are exactly the network's), loaded with ``strict=True``.

Nothing is loaded leniently: a key left over on either side, or a tensor of another shape, is refused with
its name (:class:`~maisi.errors.CheckpointError`, exit 2).

The scale factor (latents are divided by it before decoding) is, in this order: ``$.sampling.scale_factor``,
the diffusion UNet checkpoint's (ours stores 1/std of the training latents), the preset's default (the
BraTS bundles sample with 1.0: their sampler never divides by the training 1/std). Where it came from is
recorded with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from maisi.checkpoints import FORMAT, check_fits, load_strictly, read_weights
from maisi.config import InferConfig
from maisi.device import autocast_dtype
from maisi.errors import CheckpointError
from maisi.families.ldm import LDM_PARTS, LDMPart, LDMPreset, build_ldm_network, get_ldm_preset
from maisi.families.legacy_weights import load_legacy_state_dict
from maisi.files import file_sha256

log = logging.getLogger(__name__)

LDMWeightsFormat = Literal["maisi-checkpoint", "generative-0.x", "monai-state-dict"]
ScaleSource = Literal["config", "checkpoint", "preset"]
_MAISI_RELEASED = ("released-unet", "released-controlnet")


@dataclass(frozen=True)
class LDMWeights:
    """A weights file loaded into a network: its layout, SHA-256 and (ours) stored scale factor."""

    part: LDMPart
    path: Path
    format: LDMWeightsFormat
    sha256: str
    scale_factor: float | None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "sha256": self.sha256}


@dataclass(frozen=True)
class ScaleFactor:
    """The scale factor used and where it came from (``source``), with why (``detail``)."""

    value: float
    source: ScaleSource
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "detail": self.detail}


@dataclass(frozen=True)
class LDMModels:
    """The loaded networks of an LDM preset (eval mode, on ``device``) and how to run them."""

    preset: LDMPreset
    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    weights: dict[LDMPart, LDMWeights]
    scale: ScaleFactor
    device: torch.device
    dtype: torch.dtype | None  # autocast of the UNet (None: float32)
    decode_dtype: torch.dtype | None  # autocast of the decoder


def _missing_hint(preset: LDMPreset) -> str:
    if preset.released_variant is None:
        return ""
    return (
        f" (the released weights of preset '{preset.name}': python -m maisi.download --variant "
        f"{preset.released_variant} --dest models/seeds)"
    )


def load_ldm_network(
    preset: LDMPreset, part: LDMPart, path: str | Path, *, use_flash_attention: bool = False
) -> tuple[torch.nn.Module, LDMWeights]:
    """Build ``part`` of ``preset`` on the CPU and load ``path`` into it strictly (eval mode).

    Raises:
        CheckpointError: a missing or unreadable file, a file holding code, a checkpoint of another part or
            preset, a MAISI file, or weights that do not fit the network (keys named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{part} weights not found: {path}{_missing_hint(preset)}")
    network = build_ldm_network(preset, part, use_flash_attention=use_flash_attention)
    weights = read_weights(path, part)
    if weights.source_format in _MAISI_RELEASED:
        raise CheckpointError(
            f"{path}: a released MAISI {weights.source_format.removeprefix('released-')} file, not "
            f"weights of the LDM preset '{preset.name}'"
        )
    if weights.source_format == "maisi":
        check_fits(weights, preset, part, network)  # type: ignore[arg-type]  # duck-typed preset
        network.load_state_dict(weights.state_dict, strict=True)
        fmt: LDMWeightsFormat = FORMAT  # type: ignore[assignment]
    elif set(weights.state_dict) == set(network.state_dict()):
        load_strictly(network, weights.state_dict, f"{path}: MONAI-layout {part} weights")
        fmt = "monai-state-dict"
    else:
        load_legacy_state_dict(network, weights.state_dict, source=str(path))
        fmt = "generative-0.x"
    return network.eval(), LDMWeights(part, path, fmt, file_sha256(path), weights.scale_factor)


def resolve_scale_factor(preset: LDMPreset, unet: LDMWeights, override: float | None) -> ScaleFactor:
    """The scale factor to decode with: the config's, else the UNet checkpoint's, else the preset's."""
    if override is not None:
        return ScaleFactor(float(override), "config", "$.sampling.scale_factor")
    if unet.scale_factor is not None:
        return ScaleFactor(unet.scale_factor, "checkpoint", f"stored in {unet.path.name}")
    if unet.format == FORMAT:
        log.warning(
            "%s stores no scale_factor: decoding with preset '%s''s default %g",
            unet.path,
            preset.name,
            preset.scale_factor,
        )
    return ScaleFactor(preset.scale_factor, "preset", preset.scale_factor_source)


def load_ldm_models(config: InferConfig, device: torch.device) -> LDMModels:
    """The preset's autoencoder and diffusion UNet with the config's checkpoints, on ``device``.

    Raises:
        CheckpointError: see :func:`load_ldm_network`.
    """
    preset = get_ldm_preset(config.preset)
    flash = device.type == "cuda"
    paths = {
        "autoencoder": config.checkpoints.autoencoder,
        "diffusion_unet": config.checkpoints.diffusion_unet,
    }
    networks, weights = {}, {}
    for part in LDM_PARTS:
        networks[part], weights[part] = load_ldm_network(preset, part, paths[part], use_flash_attention=flash)
    scale = resolve_scale_factor(preset, weights["diffusion_unet"], config.sampling.scale_factor)
    return LDMModels(
        preset,
        networks["autoencoder"].to(device),
        networks["diffusion_unet"].to(device),
        weights,
        scale,
        device,
        autocast_dtype(config.precision, device),  # 'auto': float16 on CUDA, float32 on CPU
        autocast_dtype(config.precision, device),
    )
