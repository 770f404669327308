"""Preview pictures: three orthogonal mid-slices of a volume, one row per display window, as one PNG.

The windows follow the modality: a CT (HU) gets a soft-tissue and a lung window; an MR volume (arbitrary
units, MAISI's [0, 1000] output scale) gets one window spanning its own 0.5 to 99.5 percentiles, so that
neither its dark background nor a few bright voxels set the contrast (a fixed HU window would show it as
white). Slices are shown in the radiological convention (patient right on the image left, anterior / superior
up) and resampled to square pixels so anisotropic volumes are not squashed. With a mask, the outline of
every label is drawn over the CT in a colour of its own (an RGB PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from maisi.atomic import atomic_path
from maisi.data.io import Volume, to_ras
from maisi.intensity import is_mr

GAP = 4  # pixels between panels


def window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Intensities (HU for CT) -> uint8 grey levels for a display window."""
    lo = level - width / 2.0
    return (np.clip((values - lo) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _square_pixels(plane: np.ndarray, spacing_rows: float, spacing_cols: float) -> np.ndarray:
    """Nearest-neighbour resize so both pixel sides equal the finer spacing."""
    target = min(spacing_rows, spacing_cols)
    rows = np.minimum(
        (np.arange(round(plane.shape[0] * spacing_rows / target)) * target / spacing_rows).astype(int),
        plane.shape[0] - 1,
    )
    cols = np.minimum(
        (np.arange(round(plane.shape[1] * spacing_cols / target)) * target / spacing_cols).astype(int),
        plane.shape[1] - 1,
    )
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
    canvas = np.zeros((height, width, *panels[0].shape[2:]), dtype=np.uint8)
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


def resize_nearest(picture: np.ndarray, height: int) -> np.ndarray:
    """Scale a (rows, cols[, channels]) picture to ``height`` rows, aspect kept, by nearest neighbour."""
    factor = height / picture.shape[0]
    rows = np.minimum((np.arange(height) / factor).astype(int), picture.shape[0] - 1)
    cols = np.minimum(
        (np.arange(round(picture.shape[1] * factor)) / factor).astype(int), picture.shape[1] - 1
    )
    return picture[np.ix_(rows, cols)]


def stack_rows(rows: list[np.ndarray], split: int | None = None) -> np.ndarray:
    """Pictures top to bottom, left-aligned, ``GAP`` pixels apart; a grey line in the gap before row
    ``split``."""
    height = sum(r.shape[0] for r in rows) + GAP * (len(rows) - 1)
    canvas = np.zeros((height, max(r.shape[1] for r in rows), *rows[0].shape[2:]), dtype=np.uint8)
    top = 0
    for i, row in enumerate(rows):
        if i and i == split:
            canvas[top - GAP // 2 - 1, :] = 128
        canvas[top : top + row.shape[0], : row.shape[1]] = row
        top += row.shape[0] + GAP
    return canvas


def write_png(path: str | Path, picture: np.ndarray) -> Path:
    """A uint8 picture, (rows, cols) grey or (rows, cols, 3) RGB, as PNG, atomically."""
    image = sitk.GetImageFromArray(picture, isVector=picture.ndim == 3)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp))
    return Path(path)


Window = tuple[str, float, float]  # (name, level, width) in the volume's own units

# (name, level, width) in HU: soft tissue for organs, lung for parenchyma and lung lesions, which the
# soft-tissue window shows as uniform black.
PREVIEW_WINDOWS: tuple[Window, ...] = (
    ("soft tissue", 40.0, 400.0),
    ("lung", -600.0, 1500.0),
)
# MR has no absolute scale: the window spans these percentiles of the volume itself (0.5 rather than 0, as
# background and a few outliers would otherwise decide the contrast).
MR_PREVIEW_PERCENTILES = (0.5, 99.5)
MIN_ROW_HEIGHT = 256  # pixels; a 96-voxel demo volume would otherwise be a thumbnail


def mr_display_window(image: np.ndarray) -> Window:
    """The window from the 0.5 to the 99.5 percentile of ``image`` (a constant image: a width of 1)."""
    low, high = (float(v) for v in np.percentile(image, MR_PREVIEW_PERCENTILES))
    width = high - low if high > low else 1.0
    return ("MR 0.5-99.5 percentile", low + width / 2.0, width)


def display_windows(volume: Volume, modality: str | int = "ct") -> tuple[Window, ...]:
    """The windows a preview of ``volume`` shows: CT :data:`PREVIEW_WINDOWS` (HU), MR (modality code >= 8)
    the one :func:`mr_display_window` of its own intensities.

    Raises:
        InputError: ``modality`` is not a name of MAISI's modality mapping.
    """
    return (mr_display_window(volume.array),) if is_mr(modality) else PREVIEW_WINDOWS


def preview_picture(
    volume: Volume,
    mask: Volume | None = None,
    windows: tuple[Window, ...] | None = None,
    min_row_height: int = MIN_ROW_HEIGHT,
    modality: str | int = "ct",
) -> np.ndarray:
    """One row of three mid-planes per display window, enlarged by a whole factor to ``min_row_height``.

    Args:
        windows: the display windows; None: those of ``modality`` (:func:`display_windows`).

    Returns:
        (rows, cols) uint8 without ``mask``; (rows, cols, 3) RGB with the label outlines drawn on top.
    """
    windows = display_windows(volume, modality) if windows is None else windows
    planes = [p.astype(np.float32) for p in three_planes(volume)]
    label_planes = three_planes(mask) if mask is not None else None
    scale = max(1, -(-min_row_height // max(p.shape[0] for p in planes)))  # whole factor: crisp voxels
    rows = []
    for _, level, width in windows:
        panels = [window(p, level, width) for p in planes]
        if label_planes is not None:
            panels = [overlay(g, m) for g, m in zip(panels, label_planes)]
        row = montage(panels)
        rows.append(np.repeat(np.repeat(row, scale, axis=0), scale, axis=1))
    return stack_rows(rows)


def write_preview(
    path: str | Path,
    volume: Volume,
    mask: Volume | None = None,
    windows: tuple[Window, ...] | None = None,
    modality: str | int = "ct",
) -> Path:
    """Write the preview of a CT (HU) or MR volume as a PNG, atomically: see :func:`preview_picture`."""
    return write_png(path, preview_picture(volume, mask, windows, modality=modality))
