"""Image intensities on the VAE's [0, 1] scale, and back, as MAISI does for CT and MR.

- CT: HU clipped to [-1000, 1000] and mapped to [0, 1]; decoded [0, 1] (clipped) back to int16 HU.
- MR (modality code >= 8 in MAISI's modality mapping): each image's 0 to 99.5 percentile range is mapped to
  [0, 1], NOT clipped (NV-Generate-CTMR ``scripts/transforms.py``: ``ScaleIntensityRangePercentilesd(lower=0,
  upper=99.5, b_min=0, b_max=1, clip=False)``); decoded output is mapped [0, 1] -> [0, 1000] with values
  below 0 clipped and no upper clip (``scripts/diff_model_infer.py``), an arbitrary MR unit, not HU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import ScaleIntensityRange, percentile

from maisi.conditioning import modality_code
from maisi.errors import InputError

HU_MIN = -1000.0
HU_MAX = 1000.0
MR_MIN_CODE = 8  # MAISI: modality codes >= 8 are MR ("mri" 8, "mri_t1" 9, ...)
MR_PERCENTILES = (0.0, 99.5)
MR_OUTPUT_MAX = 1000.0  # decoded 1.0 -> 1000 (MAISI's MR output scale)
_INT16_MAX = float(np.iinfo(np.int16).max)


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] float32, clipping outside [-1000, 1000] (the VAE's input scale)."""
    return ((np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)).astype(np.float32)


def unit_to_hu(unit: np.ndarray) -> np.ndarray:
    """Decoded [0, 1] values -> int16 HU in [-1000, 1000] (values outside [0, 1] are clipped)."""
    hu = np.clip(unit, 0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN
    return np.round(hu).astype(np.int16)


def set_outside_body(hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Air (-1000 HU) wherever the mask is background (label 0), as MAISI post-processes."""
    out = hu.copy()
    out[mask == 0] = int(HU_MIN)
    return out


def modality_code_of(modality: str | int) -> int:
    """MAISI's integer code of a modality name (or the code itself).

    Raises:
        InputError: a name that is not in MAISI's modality mapping.
    """
    return modality if isinstance(modality, int) else modality_code(modality)


def is_mr(modality: str | int) -> bool:
    """Whether MAISI treats ``modality`` as MR (code >= 8): percentile scaling in, [0, 1000] out, no HU
    check."""
    return modality_code_of(modality) >= MR_MIN_CODE


@dataclass(frozen=True)
class MRWindow:
    """The intensities of one MR image that map to 0 and 1 (its 0 and 99.5 percentiles)."""

    low: float
    high: float

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "mr_percentile",
            "percentiles": list(MR_PERCENTILES),
            "window": [self.low, self.high],
            "scaled_to": [0.0, 1.0],
            "clipped": False,
            "pad_value": 0.0,  # the unit value padding gets: the image's 0 percentile (its minimum)
        }


def mr_window(image: np.ndarray, where: str = "MR image") -> MRWindow:
    """The 0 and 99.5 percentiles of ``image``, computed as MONAI's ScaleIntensityRangePercentiles does.

    Raises:
        InputError: the image is constant (nothing to scale: every voxel would map to 0), naming ``where``.
    """
    values = torch.as_tensor(np.asarray(image, dtype=np.float32))
    low, high = (float(percentile(values, q)) for q in MR_PERCENTILES)
    if not high > low:
        raise InputError(
            f"{where}: its 0 and 99.5 percentiles are equal ({low:g}); a constant MR image cannot be scaled "
            "to [0, 1]"
        )
    return MRWindow(low, high)


def mr_to_unit(
    image: np.ndarray, window: MRWindow | None = None, where: str = "MR image"
) -> tuple[np.ndarray, MRWindow]:
    """MR intensities -> the VAE's scale: ``window`` (default: the image's own percentiles) to [0, 1], not
    clipped (values above the 99.5 percentile exceed 1).

    Returns:
        The float32 array of ``image``'s shape and the window used.
    """
    window = window or mr_window(image, where)
    scale = ScaleIntensityRange(a_min=window.low, a_max=window.high, b_min=0.0, b_max=1.0, clip=False)
    unit = scale(torch.as_tensor(np.asarray(image, dtype=np.float32)))
    return np.asarray(unit, dtype=np.float32), window


def unit_to_mr_source(unit: np.ndarray, window: MRWindow) -> np.ndarray:
    """The inverse of :func:`mr_to_unit`: [0, 1] back to the source image's intensities (float32)."""
    return (np.asarray(unit, dtype=np.float64) * (window.high - window.low) + window.low).astype(np.float32)


def unit_to_mr(unit: np.ndarray) -> np.ndarray:
    """Decoded [0, 1] MR -> int16 in [0, 1000] as MAISI saves MR: negatives clipped to 0, no upper clip
    (values above 32.767 on the unit scale saturate at the int16 maximum instead of wrapping)."""
    out = np.clip(np.asarray(unit, dtype=np.float64) * MR_OUTPUT_MAX, 0.0, _INT16_MAX)
    return np.round(out).astype(np.int16)


CT_INPUT_RECORD: dict[str, Any] = {
    "hu_window": [HU_MIN, HU_MAX],
    "scaled_to": [0.0, 1.0],
    "pad_value_hu": HU_MIN,
}


def output_mapping(modality: str | int) -> dict[str, Any]:
    """How a generated image's decoded [0, 1] values became the saved voxels (for its metadata)."""
    if is_mr(modality):
        return {
            "kind": "mr",
            "unit_to": [0.0, MR_OUTPUT_MAX],
            "clip": "below 0 only (no upper clip), as MAISI",
            "dtype": "int16",
            "units": "arbitrary MR intensity (not HU)",
        }
    return {"kind": "ct", "unit_to": [HU_MIN, HU_MAX], "clip": "[0, 1]", "dtype": "int16", "units": "HU"}


def to_unit(
    image: np.ndarray, modality: str | int, where: str = "image"
) -> tuple[np.ndarray, dict[str, Any]]:
    """An image on the VAE's [0, 1] scale by its modality, and the record of the mapping used.

    CT: :func:`hu_to_unit`; MR: :func:`mr_to_unit` with the image's own percentiles.
    """
    if is_mr(modality):
        unit, window = mr_to_unit(image, where=where)
        return unit, window.to_json()
    return hu_to_unit(image), {"hu_window": [HU_MIN, HU_MAX], "scaled_to": [0.0, 1.0], "pad_value_hu": HU_MIN}
