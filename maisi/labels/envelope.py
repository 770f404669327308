"""The body envelope: label 200 for every body voxel that is not an organ.

MAISI's ControlNet was trained on masks where all of the body that is not an organ is labelled 200;
segmenter output (TotalSegmentator etc.) lacks it. The envelope is found on the CT: voxels above an air
threshold, opened to cut thin bridges to the scanner table and clothing, the largest connected component,
holes filled in 3D and then slice by slice (lungs and bowel gas are inside the body).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from maisi.data.io import Volume, require_same_grid
from maisi.labels import BODY_LABEL

DEFAULT_THRESHOLD_HU = -800.0
DEFAULT_OPENING_MM = 4.0


def _to_sitk(array: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    return image


def _from_sitk(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _fill_holes_per_slice(body: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice (z is the last array axis in RAS)."""
    out = body.copy()
    for z in range(body.shape[2]):
        if out[:, :, z].any():
            out[:, :, z] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(out[:, :, z])))
    return out


def body_envelope(ct: Volume, threshold_hu: float = DEFAULT_THRESHOLD_HU,
                  opening_mm: float = DEFAULT_OPENING_MM) -> np.ndarray:  # fmt: skip
    """Boolean (x, y, z) mask of the patient's body in a CT (HU).

    Args:
        ct: CT volume in HU.
        threshold_hu: voxels above it are tissue candidates (air is about -1000 HU, lung about -850).
        opening_mm: radius of the morphological opening that detaches the table; 0 disables it.
    """
    tissue = (ct.array > threshold_hu).astype(np.uint8)
    if not tissue.any():
        return tissue.astype(bool)
    image = _to_sitk(tissue, ct.spacing)
    if opening_mm > 0:
        radius = [max(1, int(round(opening_mm / s))) if opening_mm >= s else 0 for s in ct.spacing]
        opened = sitk.BinaryMorphologicalOpening(image, radius, sitk.sitkBall)
        if sitk.GetArrayViewFromImage(opened).any():  # a very thin body would vanish: then skip the opening
            image = opened
    components = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True)
    largest = sitk.BinaryFillhole(components == 1)
    return _fill_holes_per_slice(_from_sitk(largest).astype(np.uint8)).astype(bool)


def add_body_label(mask: Volume, ct: Volume, threshold_hu: float = DEFAULT_THRESHOLD_HU,
                   opening_mm: float = DEFAULT_OPENING_MM) -> tuple[Volume, int]:  # fmt: skip
    """Label background voxels inside the body envelope 200; organ labels are never changed.

    Returns:
        The new mask and the number of voxels that became 200.

    Raises:
        InputError: the CT and the mask are not on the same grid.
    """
    require_same_grid(ct, mask)
    envelope = body_envelope(ct, threshold_hu, opening_mm)
    added = envelope & (mask.array == 0)
    out = mask.array.copy()
    out[added] = BODY_LABEL
    return mask.with_array(out), int(added.sum())
