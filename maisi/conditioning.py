"""Conditioning inputs of the MAISI networks, computed exactly as MAISI feeds them.

- spacing: millimetres x 100, shape (N, 3);
- body region: one-hot x 100, shape (N, 4), order head/neck, chest, abdomen, pelvis/lower;
- modality: integer code, shape (N,), for presets with a class embedding;
- label mask -> ControlNet: 8 binary channels, channel k = bit k of the label (LSB first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from maisi.errors import InputError
from maisi.families.ct import Preset
from maisi.options import BODY_REGIONS, BodyRegion
from maisi.resources import load_json

# MAISI ids whose presence puts a region in the volume: brain, skull; the five lung lobes; liver, spleen,
# pancreas, right and left kidney; left and right femur. Real organ classes only: id 2 (MAISI's dummy1, a
# free slot that `maisi.labels add` may give to a new class) was listed for the abdomen until issue 18.
REGION_MARKER_LABELS: dict[BodyRegion, tuple[int, ...]] = {
    "head_neck": (22, 120),
    "chest": (28, 29, 30, 31, 32),
    "abdomen": (1, 3, 4, 5, 14),
    "pelvis_lower": (93, 94),
}
LABEL_BITS = 8  # the ControlNet takes 8 bit-planes: labels 0..255


def spacing_tensor(spacing_mm: tuple[float, float, float], batch: int = 1) -> torch.Tensor:
    """(N, 3) float tensor of the voxel spacing in mm x 100 (1.5 mm -> 150)."""
    return torch.tensor([spacing_mm], dtype=torch.float32).repeat(batch, 1) * 100.0


def region_tensor(region: BodyRegion, batch: int = 1) -> torch.Tensor:
    """(N, 4) float tensor: one-hot of ``region`` x 100."""
    onehot = torch.zeros(batch, len(BODY_REGIONS), dtype=torch.float32)
    onehot[:, BODY_REGIONS.index(region)] = 100.0
    return onehot


def body_region_from_mask(mask: np.ndarray) -> tuple[BodyRegion, BodyRegion] | None:
    """(top, bottom) body regions present in a MAISI-id mask, or None when no marker organ is present.

    Top is the first present region in head-to-feet order, bottom the last.
    """
    present_labels = set(np.unique(mask).tolist())
    present = [r for r in BODY_REGIONS if present_labels.intersection(REGION_MARKER_LABELS[r])]
    if not present:
        return None
    return present[0], present[-1]


def modality_code(modality: str) -> int:
    """Integer code of a modality name (``"ct"`` -> 1) from MAISI's modality mapping."""
    mapping: dict[str, int] = load_json("maisi_modality_mapping.json")
    if modality not in mapping:
        raise InputError(f"unknown modality '{modality}'; known: {', '.join(mapping)}")
    return mapping[modality]


UNCONDITIONAL_MODALITY = 0  # "unknown": the class label of classifier-free guidance's unconditional branch


def binarize_labels(labels: torch.Tensor) -> torch.Tensor:
    """Integer label volume (N, 1, X, Y, Z) -> (N, 8, X, Y, Z) float bit-planes, LSB first."""
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= 2**LABEL_BITS):
        raise ValueError(
            f"labels must lie in [0, {2**LABEL_BITS - 1}], got [{int(labels.min())}, {int(labels.max())}]"
        )
    bits = 2 ** torch.arange(LABEL_BITS, device=labels.device)
    planes = labels.long().unsqueeze(-1).bitwise_and(bits).ne(0)  # (N, 1, X, Y, Z, 8)
    return planes.squeeze(1).permute(0, 4, 1, 2, 3).float()


@dataclass(frozen=True)
class Conditions:
    """What a sample is conditioned on, in user terms."""

    spacing_mm: tuple[float, float, float]
    top_region: BodyRegion | None = None
    bottom_region: BodyRegion | None = None
    modality: str = "ct"
    modality_code: int = field(init=False)  # the code fed to the UNet, recorded with every sample

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality_code", modality_code(self.modality))

    def network_inputs(self, preset: Preset, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Keyword tensors for the diffusion UNet of ``preset`` (only those it was built to take)."""
        out: dict[str, torch.Tensor] = {}
        if preset.uses_spacing:
            out["spacing_tensor"] = spacing_tensor(self.spacing_mm, batch).to(device)
        if preset.uses_body_region:
            if self.top_region is None or self.bottom_region is None:
                raise InputError(f"preset '{preset.name}' is conditioned on body region, but none was given")
            out["top_region_index_tensor"] = region_tensor(self.top_region, batch).to(device)
            out["bottom_region_index_tensor"] = region_tensor(self.bottom_region, batch).to(device)
        if preset.uses_modality:
            out["class_labels"] = torch.full((batch,), self.modality_code, dtype=torch.long, device=device)
        return out
