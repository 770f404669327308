"""Preview pictures: three orthogonal mid-slices of a CT in a display window, as one PNG.

Slices are shown in the radiological convention (patient right on the image left, anterior / superior
up) and resampled to square pixels so anisotropic volumes are not squashed. With a mask, the outline of
every label is drawn over the CT in a colour of its own (an RGB PNG).
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


def label_colour(label: int) -> np.ndarray:
    """A saturated RGB colour per label id, the same in every picture."""
    hue = (label * 0.618033988749895) % 1.0  # golden-ratio steps spread neighbouring ids apart
    rgb = np.clip(np.abs((hue * 6.0 + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def outline(labels: np.ndarray) -> np.ndarray:
    """Boolean 2D map of labelled pixels whose 4-neighbourhood holds another label."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, dtype=bool)
    for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dr : dr + labels.shape[0], dc : dc + labels.shape[1]] != centre
    return edge & (labels > 0)


def overlay(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) RGB picture: the grey image with each label's outline in its colour."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    edges = outline(labels)
    for label in np.unique(labels[edges]):
        rgb[edges & (labels == label)] = label_colour(int(label))
    return rgb


def write_preview(path: str | Path, ct: Volume, mask: Volume | None = None, level: float = 40.0,
                  width: float = 400.0) -> Path:  # fmt: skip
    """Write the three-plane preview of a CT (HU) as a PNG, atomically; with ``mask``, label outlines on top."""
    panels = [window(p.astype(np.float32), level, width) for p in three_planes(ct)]
    if mask is None:
        picture = sitk.GetImageFromArray(montage(panels))
    else:
        coloured = [overlay(g, m) for g, m in zip(panels, three_planes(mask))]
        channels = [montage([c[..., k] for c in coloured]) for k in range(3)]
        picture = sitk.GetImageFromArray(np.stack(channels, axis=-1), isVector=True)
    with atomic_path(path) as tmp:
        sitk.WriteImage(picture, str(tmp))
    return Path(path)
