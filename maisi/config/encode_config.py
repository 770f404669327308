"""The ``maisi.encode`` config: dataclasses mirroring ``schemas/encode.schema.json``; checks against the
preset are in :mod:`maisi.families.checks`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maisi.families.ct import get_preset
from maisi.families.mask import get_mask_preset
from maisi.options import DecodeMethod, DeviceName, EncodeKind, Modality, Precision, ThreadsSetting


@dataclass(frozen=True)
class TilingConfig:
    method: DecodeMethod
    roi_size: tuple[int, int, int]
    overlap: float
    memory_budget_mb: int


@dataclass(frozen=True)
class EncodeConfig:
    kind: EncodeKind
    preset: str
    autoencoder: str
    datalist: str
    data_root: str | None
    output_dir: str
    output_datalist: str | None
    target_spacing: tuple[float, float, float] | None
    pad_to_multiple: int | None
    latent: Literal["mean", "sample"]
    seed: int
    tiling: TilingConfig
    modality: Modality
    device: DeviceName
    precision: Precision
    threads: ThreadsSetting
    nonfinite: Literal["error", "fill_air"]

    @property
    def multiple(self) -> int:
        """Padding multiple actually used: the configured one, or what the preset's UNet needs."""
        if self.pad_to_multiple:
            return self.pad_to_multiple
        if self.kind == "mask":
            preset = get_mask_preset(self.preset)
            return preset.vae_factor * 2 ** (len(preset.diffusion_unet["channels"]) - 1)
        return get_preset(self.preset).spatial_multiple


def check_encode_config(config: EncodeConfig) -> list[str]:
    """Nothing relates several keys of an encode config beyond what the schema says."""
    return []
