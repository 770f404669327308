"""Preview pictures: three orthogonal mid-slices of a CT in a display window, as one PNG.

Slices are shown in the radiological convention (patient right on the image left, anterior / superior
up) and resampled to square pixels so anisotropic volumes are not squashed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from maisi.atomic import atomic_path
from maisi.data.io import Volume, to_ras

GAP = 4  # pixels between panels


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> uint8 grey levels for a display window."""
    lo = level - width / 2.0
    return (np.clip((hu - lo) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _square_pixels(plane: np.ndarray, spacing_rows: float, spacing_cols: float) -> np.ndarray:
    """Nearest-neighbour resize so both pixel sides equal the finer spacing."""
    target = min(spacing_rows, spacing_cols)
    rows = np.minimum((np.arange(round(plane.shape[0] * spacing_rows / target)) * target / spacing_rows).astype(int),
                      plane.shape[0] - 1)  # fmt: skip
    cols = np.minimum((np.arange(round(plane.shape[1] * spacing_cols / target)) * target / spacing_cols).astype(int),
                      plane.shape[1] - 1)  # fmt: skip
    return plane[np.ix_(rows, cols)]


def three_planes(volume: Volume) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices, oriented for display (rows, cols)."""
    volume = to_ras(volume)
    a = volume.array
    sx, sy, sz = volume.spacing
    cx, cy, cz = (s // 2 for s in a.shape[:3])
    axial = a[::-1, ::-1, cz].T  # rows: anterior -> posterior, cols: right -> left
    coronal = a[::-1, cy, ::-1].T  # rows: superior -> inferior, cols: right -> left
    sagittal = a[cx, ::-1, ::-1].T  # rows: superior -> inferior, cols: anterior -> posterior
    return [_square_pixels(axial, sy, sx), _square_pixels(coronal, sz, sx), _square_pixels(sagittal, sz, sy)]


def montage(panels: list[np.ndarray]) -> np.ndarray:
    """Panels side by side, top-aligned, on a black background."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    canvas = np.zeros((height, width), dtype=np.uint8)
    col = 0
    for p in panels:
        canvas[: p.shape[0], col : col + p.shape[1]] = p
        col += p.shape[1] + GAP
    return canvas


def write_preview(path: str | Path, ct: Volume, level: float = 40.0, width: float = 400.0) -> Path:
    """Write the three-plane preview of a CT (HU) as a greyscale PNG, atomically."""
    picture = montage([window(p.astype(np.float32), level, width) for p in three_planes(ct)])
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(picture), str(tmp))
    return Path(path)
