"""Lesion placement: size, containment in the host, reproducibility, several lesions, and refusals."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from maisi.data.io import Volume, read_mask
from maisi.errors import InputError
from maisi.labels import BODY_LABEL, load_label_dict
from maisi.labels.mapping import load_mapping, remap
from maisi.masks.lesions import LesionRequest, place_lesion, place_lesions
from maisi.seeding import stream_seed

DATA = Path(__file__).resolve().parents[1] / "data"
LIVER, HEPATIC_TUMOR, SPLEEN = 1, 26, 3
ANISO = (1.0, 1.0, 2.5)


def ellipsoid_mask(shape=(100, 100, 40), spacing=ANISO, semi_axes_mm=(40.0, 35.0, 40.0)) -> Volume:
    """Body (200) everywhere, a liver (1) ellipsoid in the middle, a spleen (3) slab at one end."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    centre = [(n - 1) * s / 2 for n, s in zip(shape, spacing)]
    inside = sum(((g - c) / a) ** 2 for g, c, a in zip((x, y, z), centre, semi_axes_mm)) < 1
    array = np.full(shape, BODY_LABEL, dtype=np.uint8)
    array[inside] = LIVER
    array[:, :, :6] = SPLEEN  # 15 mm thick at 2.5 mm
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-20.0, 35.0, 100.0)
    return Volume(array, affine)


@pytest.fixture(scope="module")
def real_mask() -> Volume:
    """The TotalSegmentator example (3 mm) in MAISI ids."""
    volume = read_mask(DATA / "totalseg_example_seg.nii.gz")
    array, _ = remap(volume.array, load_mapping("totalsegmentator", load_label_dict()))
    return volume.with_array(array)


def equivalent_diameter(voxels: int, spacing) -> float:
    return (6 * voxels * float(np.prod(spacing)) / math.pi) ** (1 / 3)


def check_placed(before: Volume, after: Volume, record: dict, hosts=(LIVER,), diameter=20.0) -> np.ndarray:
    """The lesion has the requested size, is one piece inside the host, and nothing else changed."""
    changed = before.array != after.array
    lesion = changed & (after.array == record["label"])
    assert np.array_equal(changed, lesion), "only lesion voxels change"
    assert np.isin(before.array[lesion], hosts).all(), "every lesion voxel was a host voxel"
    measured = equivalent_diameter(int(lesion.sum()), before.spacing)
    assert abs(measured - diameter) <= 3.0
    assert record["voxels"] == int(lesion.sum())
    assert record["equivalent_diameter_mm"] == pytest.approx(measured, abs=1e-3)
    assert ndimage.label(lesion)[1] == 1
    # away from the boundary: every lesion voxel more than the margin from any non-host voxel
    depth = ndimage.distance_transform_edt(np.pad(np.isin(before.array, hosts), 1), sampling=before.spacing)
    assert depth[1:-1, 1:-1, 1:-1][lesion].min() > record["margin_mm"]
    centre = tuple(record["centre_voxel"])
    assert lesion[centre]
    assert np.allclose(record["centre_mm"], (before.affine @ [*centre, 1.0])[:3], atol=1e-3)
    return lesion


def test_20mm_lesion_in_anisotropic_host_measures_20mm_and_stays_inside():
    mask = ellipsoid_mask()
    original = mask.array.copy()
    out, record = place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=20, host_labels=(LIVER,), seed=0)
    check_placed(mask, out, record)
    assert np.array_equal(mask.array, original), "the input mask is not modified"
    assert np.array_equal(out.affine, mask.affine)
    assert record["label"] == HEPATIC_TUMOR and record["host_labels"] == [LIVER] and record["seed"] == 0
    assert record["requested_diameter_mm"] == 20.0 and record["margin_mm"] == 2.5  # default: coarsest voxel


def test_20mm_hepatic_tumor_in_the_real_liver(real_mask: Volume):
    out, record = place_lesion(real_mask, label=HEPATIC_TUMOR, diameter_mm=20, host_labels=(LIVER,), seed=3)
    check_placed(real_mask, out, record)


def test_lesion_is_irregular_smooth_and_larger_than_its_equivalent_sphere_in_extent():
    mask = ellipsoid_mask(spacing=(1.0, 1.0, 1.0), shape=(100, 100, 100))
    out, record = place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=20, host_labels=(LIVER,), seed=1)
    lesion = out.array == HEPATIC_TUMOR
    # the ball of the same voxel count around the same centre overlaps it only partly
    grid = np.argwhere(np.ones(mask.shape, dtype=bool)) - record["centre_voxel"]
    ball = np.zeros(mask.shape, dtype=bool)
    ball.flat[np.argsort(np.linalg.norm(grid, axis=1), kind="stable")[: int(lesion.sum())]] = True
    dice = 2 * (lesion & ball).sum() / (lesion.sum() + ball.sum())
    assert 0.7 < dice < 0.95
    assert np.array_equal(ndimage.binary_fill_holes(lesion), lesion), "no holes"
    assert record["max_extent_mm"] > record["equivalent_diameter_mm"]


def test_same_seed_same_mask_and_different_seeds_different_places():
    mask = ellipsoid_mask()
    runs = [
        place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=20, host_labels=(LIVER,), seed=s) for s in (7, 7)
    ]
    assert np.array_equal(runs[0][0].array, runs[1][0].array) and runs[0][1] == runs[1][1]
    centres = {
        tuple(
            place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=20, host_labels=(LIVER,), seed=s)[1][
                "centre_voxel"
            ]
        )
        for s in range(5)
    }
    assert len(centres) == 5


def test_host_that_fills_the_volume_keeps_the_lesion_inside_the_volume():
    """The volume's edge counts as the host's boundary (no lesion cut off or wrapped around)."""
    mask = Volume(np.full((30, 30, 12), LIVER, dtype=np.uint8), np.diag([*ANISO, 1.0]))
    out, record = place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=20, host_labels=(LIVER,), seed=0)
    check_placed(mask, out, record)


def test_several_lesions_are_placed_in_order_and_kept_apart():
    mask = ellipsoid_mask()
    requests = [
        LesionRequest(HEPATIC_TUMOR, 20.0, (LIVER,)),
        LesionRequest(HEPATIC_TUMOR, 20.0, (LIVER,), margin_mm=4.0),
        LesionRequest(27, 10.0, (SPLEEN,), margin_mm=0.0),
    ]
    out, records = place_lesions(mask, requests, seed=5)
    assert [r["seed"] for r in records] == [stream_seed(5, "lesion", i) for i in range(3)]  # own streams
    tumours, count = ndimage.label(out.array == HEPATIC_TUMOR)
    assert count == 2 and sorted(np.bincount(tumours.ravel())[1:].tolist()) == [1676, 1676]
    first = tumours == tumours[tuple(records[0]["centre_voxel"])]
    second = tumours == tumours[tuple(records[1]["centre_voxel"])]
    gap = ndimage.distance_transform_edt(~first, sampling=mask.spacing)[second].min()
    assert gap > 4.0, "the second lesion keeps its margin from the first"
    third = out.array == 27
    assert np.all(mask.array[third] == SPLEEN) and abs(equivalent_diameter(int(third.sum()), ANISO) - 10) <= 3
    assert np.array_equal(out.array[~(first | second | third)], mask.array[~(first | second | third)])
    again, _ = place_lesions(mask, requests, seed=5)
    assert np.array_equal(again.array, out.array)


def test_several_lesions_name_the_one_that_fails():
    requests = [LesionRequest(HEPATIC_TUMOR, 20.0, (LIVER,)), LesionRequest(23, 20.0, (28,))]
    with pytest.raises(
        InputError,
        match=r"^lesions\[1\]: lesion 'lung tumor' \(23\) in host 'left lung upper lobe' \(28\) .*not in the "
        r"mask",
    ):
        place_lesions(ellipsoid_mask(), requests, seed=0)


def test_host_too_small_says_the_largest_diameter_that_fits():
    mask = ellipsoid_mask(semi_axes_mm=(12.0, 12.0, 12.0))
    with pytest.raises(InputError, match="host too small") as info:
        place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=20, host_labels=(LIVER,), seed=0)
    message = str(info.value)
    assert "lesion 'hepatic tumor' (26) in host 'liver' (1) at 20 mm" in message
    fits = float(re.search(r"largest that fits is about ([\d.]+) mm", message).group(1))
    assert 5.0 <= fits < 20.0
    out, record = place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=fits, host_labels=(LIVER,), seed=0)
    check_placed(mask, out, record, diameter=fits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"host_labels": (250,)},
            r"host 250 is not in the mask \(it holds 'liver' \(1\), 'spleen' \(3\), 'body' \(200\)\)",
        ),
        ({"diameter_mm": float("nan")}, r"diameter nan mm is not a finite number"),
        ({"diameter_mm": float("inf")}, r"diameter inf mm is not a finite number"),
        ({"diameter_mm": 0}, r"diameter 0 mm must be > 0"),
        ({"diameter_mm": -5.0}, r"diameter -5 mm must be > 0"),
        ({"diameter_mm": "20"}, r"diameter '20' mm is not a finite number"),
        ({"diameter_mm": 4.0}, r"diameter 4 mm is under 2 voxels .* the minimum is 5 mm"),
        ({"label": LIVER}, r"lesion label 'liver' \(1\) equals its host 'liver' \(1\)"),
        ({"label": BODY_LABEL}, r"lesion label 'body' \(200\) is the body label"),
        ({"label": 0}, r"lesion label 0: expected an integer id in 1..255"),
        (
            {"host_labels": ()},
            r"lesion label 'hepatic tumor' \(26\): host \(\) must be one or more integer label ids",
        ),
        ({"margin_mm": -1.0}, r"margin -1 mm must be >= 0"),
        (
            {"diameter_mm": 90.0},
            r"lesion 'hepatic tumor' \(26\) in host 'liver' \(1\) at 90 mm: host too small",
        ),
        ({"host_labels": (22,)}, r"host 'brain' \(22\) is not in the mask"),
    ],
)
def test_bad_requests_are_refused_naming_label_host_and_diameter(kwargs: dict, message: str):
    mask = ellipsoid_mask()
    original = mask.array.copy()
    args = {"label": HEPATIC_TUMOR, "diameter_mm": 20.0, "host_labels": (LIVER,), "seed": 0, **kwargs}
    with pytest.raises(InputError, match=message):
        place_lesion(mask, **args)
    assert np.array_equal(mask.array, original)


def test_a_float_mask_is_refused():
    mask = Volume(np.ones((20, 20, 20), dtype=np.float32), np.eye(4))
    with pytest.raises(InputError, match="3D integer label mask, got float32"):
        place_lesion(mask, label=HEPATIC_TUMOR, diameter_mm=5.0, host_labels=(LIVER,), seed=0)


def test_a_later_lesion_never_overwrites_an_earlier_one_even_when_its_host_holds_that_label():
    mask = ellipsoid_mask()
    requests = [LesionRequest(HEPATIC_TUMOR, 40.0, (LIVER,)), LesionRequest(27, 10.0, (LIVER, HEPATIC_TUMOR))]
    out, records = place_lesions(mask, requests, seed=0)
    first, _ = place_lesions(mask, requests[:1], seed=0)
    assert np.array_equal(out.array == HEPATIC_TUMOR, first.array == HEPATIC_TUMOR)
    second = out.array == 27
    gap = ndimage.distance_transform_edt(out.array != HEPATIC_TUMOR, sampling=mask.spacing)[second].min()
    assert gap > records[1]["margin_mm"]
    # a host that the first lesion fills leaves no room: refused rather than overwritten
    small = ellipsoid_mask(shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0), semi_axes_mm=(16.0, 16.0, 16.0))
    requests = [
        LesionRequest(HEPATIC_TUMOR, 20.0, (LIVER,), 0.0),
        LesionRequest(27, 10.0, (LIVER, HEPATIC_TUMOR)),
    ]
    with pytest.raises(
        InputError,
        match=r"lesions\[1\]: lesion 'colon cancer primaries' \(27\) in host 'liver' \(1\), 'hepatic tumor' "
        r"\(26\) at 10 mm: host too small",
    ):
        place_lesions(small, requests, seed=0)
