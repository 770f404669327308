"""CT intensities: MAISI maps HU in [-1000, 1000] to [0, 1] for the VAE, and back after decoding."""

from __future__ import annotations

import numpy as np

HU_MIN = -1000.0
HU_MAX = 1000.0


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
