"""The ``maisi.encode`` config: dataclasses mirroring ``schemas/encode.schema.json`` and cross-key checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maisi.decoding import DecodeMethod
from maisi.device import DeviceName, Precision
from maisi.errors import InputError
from maisi.networks import get_preset


@dataclass(frozen=True)
class TilingConfig:
    method: DecodeMethod
    roi_size: tuple[int, int, int]
    overlap: float
    memory_budget_mb: int


@dataclass(frozen=True)
class EncodeConfig:
    preset: str
    autoencoder: str
    datalist: str
    data_root: str | None
    output_dir: str
    output_datalist: str | None
    target_spacing: tuple[float, float, float] | None
    pad_to_multiple: int | None
    latent: str
    seed: int
    tiling: TilingConfig
    modality: str
    device: DeviceName
    precision: Precision
    nonfinite: Literal["error", "fill_air"]

    @property
    def multiple(self) -> int:
        """Padding multiple actually used: the configured one, or what the preset's UNet needs."""
        return self.pad_to_multiple or get_preset(self.preset).spatial_multiple


def check_encode_config(config: EncodeConfig) -> list[str]:
    try:
        preset = get_preset(config.preset)
    except InputError as e:
        return [f"$.preset: {e}"]
    problems = []
    f = preset.vae_factor
    if config.pad_to_multiple is not None and config.pad_to_multiple % f:
        problems.append(f"$.pad_to_multiple: {config.pad_to_multiple} is not a multiple of the VAE factor {f}")
    if config.tiling.method == "sliding_window" and any(r % f for r in config.tiling.roi_size):
        problems.append(f"$.tiling.roi_size: {list(config.tiling.roi_size)} must be multiples of the VAE factor {f}")
    return problems
