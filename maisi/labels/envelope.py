"""The body envelope: label 200 for every body voxel that is not an organ.

MAISI's ControlNet was trained on masks where all of the body that is not an organ is labelled 200;
segmenter output (TotalSegmentator etc.) lacks it. The envelope is found on the CT: voxels above an air
threshold, opened to cut thin bridges to the scanner table and clothing, the largest connected component,
holes filled in 3D and then slice by slice (lungs and bowel gas are inside the body).

A mask without lung labels would so turn the lungs into body, and the generated CT would have none:
:func:`label_body` reports how much of the new body is air, and can label the lungs from the CT instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from maisi.data.io import Volume, require_same_grid
from maisi.errors import InputError
from maisi.labels import BODY_LABEL, MAX_LABEL

DEFAULT_THRESHOLD_HU = -800.0
DEFAULT_OPENING_MM = 4.0
LUNG_LABELS = (28, 29, 30, 31, 32)  # MAISI's five lung lobes
LUNG_AIR_HU = -400.0  # aerated lung is about -850 HU; soft tissue and fat lie above -200
AIR_WARNING_FRACTION = 0.05  # warn when at least this share of the new body voxels is air
MIN_LUNG_SHARE = 0.2  # a second lung component must hold at least this share of the largest one
MAX_VESSEL_HOLE_ML = 10.0  # holes in the lungs up to this size are vessels; the mediastinum is far larger


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


def body_envelope(
    ct: Volume, threshold_hu: float = DEFAULT_THRESHOLD_HU, opening_mm: float = DEFAULT_OPENING_MM
) -> np.ndarray:
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


@dataclass(frozen=True)
class EnvelopeReport:
    """What :func:`label_body` did, in voxels, for the CLI's summary and warning."""

    body_added: int  # voxels that became BODY_LABEL
    body_air: int  # of those, voxels below LUNG_AIR_HU: air inside the body left unlabelled
    lung_added: int  # voxels given the lung label (0 without ``lung_label``)
    lung_components: int  # connected air components taken as lung
    mask_has_lungs: bool  # the mask held a MAISI lung-lobe label before

    @property
    def body_air_fraction(self) -> float:
        return self.body_air / self.body_added if self.body_added else 0.0

    def warning(self) -> str | None:
        """A warning when much of the new body is air and the mask has no lungs, else None."""
        if self.mask_has_lungs or self.lung_added or self.body_air_fraction < AIR_WARNING_FRACTION:
            return None
        share = f"{100 * self.body_air_fraction:.1f}%"
        lobes = ", ".join(map(str, LUNG_LABELS))
        return (
            f"{self.body_air} of the {self.body_added} voxels labelled body ({share}) are below "
            f"{LUNG_AIR_HU:g} HU and the mask has no lung labels ({lobes}): if that air is lung, a CT "
            "generated from this mask will have no lungs; label them with --lungs-from-hu ID (e.g. 28) "
            "or segment the lungs first"
        )


def lungs_from_hu(ct: Volume, envelope: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, int]:
    """Boolean (x, y, z) mask of the lungs: air inside the body in the largest connected components.

    Air is below LUNG_AIR_HU, inside ``envelope`` (the outside is never taken) and ``free`` (unlabelled). The
    largest component and at most one more of at least MIN_LUNG_SHARE of its size are kept (both lungs, with
    the airways joined to them); smaller components (bowel gas, mostly) stay out. Holes of up to
    MAX_VESSEL_HOLE_ML in a slice (vessels) are filled.

    Returns:
        The lung mask and the number of components kept (0 when there is no air).
    """
    air = envelope & free & (ct.array < LUNG_AIR_HU)
    if not air.any():
        return air, 0
    components = sitk.RelabelComponent(sitk.ConnectedComponent(_to_sitk(air.astype(np.uint8), ct.spacing)))
    labels = _from_sitk(components)
    sizes = np.bincount(labels.ravel())[1:]  # largest first
    kept = [k + 1 for k in range(min(2, sizes.size)) if sizes[k] >= MIN_LUNG_SHARE * sizes[0]]
    lungs = np.isin(labels, kept)
    holes = _fill_holes_per_slice(lungs.astype(np.uint8)).astype(bool) & ~lungs & envelope & free
    hole_labels = _from_sitk(sitk.ConnectedComponent(_to_sitk(holes.astype(np.uint8), ct.spacing)))
    hole_ml = np.bincount(hole_labels.ravel()) * float(np.prod(ct.spacing)) / 1000.0
    small = np.flatnonzero(hole_ml <= MAX_VESSEL_HOLE_ML)
    return lungs | (np.isin(hole_labels, small[small > 0]) & holes), len(kept)


def label_body(
    mask: Volume,
    ct: Volume,
    threshold_hu: float = DEFAULT_THRESHOLD_HU,
    opening_mm: float = DEFAULT_OPENING_MM,
    lung_label: int | None = None,
) -> tuple[Volume, EnvelopeReport]:
    """Label background voxels inside the body envelope 200 (and air in the lungs ``lung_label`` if given).

    Organ labels are never changed.

    Returns:
        The new mask and what was added.

    Raises:
        InputError: the CT and the mask are not on the same grid, or ``lung_label`` is outside 1..255
            or is 200.
    """
    require_same_grid(ct, mask)
    if lung_label is not None and not (0 < lung_label <= MAX_LABEL and lung_label != BODY_LABEL):
        raise InputError(f"lung label {lung_label}: must lie in 1..{MAX_LABEL} and not be {BODY_LABEL}")
    envelope = body_envelope(ct, threshold_hu, opening_mm)
    free = mask.array == 0
    # widened where needed: an int8 mask (NRRD "signed char") cannot hold 200
    out = mask.array.astype(np.result_type(mask.array.dtype, np.min_scalar_type(BODY_LABEL)))
    lungs, components = lungs_from_hu(ct, envelope, free) if lung_label is not None else (None, 0)
    if lungs is not None:
        out = out.astype(np.result_type(out.dtype, np.min_scalar_type(lung_label)))
        out[lungs] = lung_label
        free = free & ~lungs
    added = envelope & free
    out[added] = BODY_LABEL
    report = EnvelopeReport(
        body_added=int(added.sum()),
        body_air=int((added & (ct.array < LUNG_AIR_HU)).sum()),
        lung_added=int(lungs.sum()) if lungs is not None else 0,
        lung_components=components,
        mask_has_lungs=bool(np.isin(mask.array, LUNG_LABELS).any()),
    )
    return mask.with_array(out), report


def add_body_label(
    mask: Volume,
    ct: Volume,
    threshold_hu: float = DEFAULT_THRESHOLD_HU,
    opening_mm: float = DEFAULT_OPENING_MM,
) -> tuple[Volume, int]:
    """Label background voxels inside the body envelope 200; organ labels are never changed.

    Returns:
        The new mask and the number of voxels that became 200.

    Raises:
        InputError: the CT and the mask are not on the same grid.
    """
    labelled, report = label_body(mask, ct, threshold_hu, opening_mm)
    return labelled, report.body_added
