"""maisi.masks.augment: MAISI's mask augmentation rules on MONAI transforms.

Synthetic 64^3 masks hold every host organ of MAISI's tumour rules (liver, lung lobes, pancreas, colon,
vertebrae) plus bystanders (gallbladder notched into the liver, spleen); one tumour is put in per test.
The real mask is the TotalSegmentator example remapped to MAISI ids, with a tumour ball in its liver.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from maisi.data.io import read_mask
from maisi.errors import InputError
from maisi.labels import load_label_dict
from maisi.labels.mapping import load_mapping, remap
from maisi.masks.augment import augment_mask
from maisi.masks.tumours import BONES, LUNG_LOBES, RULES, TumourRule, rule_for

DATA = Path(__file__).resolve().parents[1] / "data"
SHAPE = (64, 64, 64)
GALLBLADDER, SPLEEN = 10, 3
RULE = {rule.tumour: rule for rule in RULES}


def _ball(centre: tuple[float, float, float], radius: float, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _phantom() -> np.ndarray:
    """Body 200 holding liver, gallbladder, spleen, pancreas, colon, five lung lobes and vertebrae L5-L1."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    grid = np.indices(SHAPE, dtype=np.float32)
    mask[((grid[0] - 32) / 30) ** 2 + ((grid[1] - 32) / 28) ** 2 + ((grid[2] - 32) / 31) ** 2 <= 1] = 200
    ring = np.hypot(np.hypot(grid[0] - 32, grid[1] - 32) - 16, grid[2] - 8) <= 5  # colon: a torus
    mask[ring] = 62
    mask[_ball((20, 30, 20), 15)] = 1
    mask[_ball((22, 46, 16), 4)] = GALLBLADDER  # cuts a notch into the liver
    mask[_ball((48, 36, 24), 6)] = SPLEEN
    mask[((grid[0] - 44) / 16) ** 2 + ((grid[1] - 20) / 11) ** 2 + ((grid[2] - 16) / 11) ** 2 <= 1] = 4
    mask[4:30, 10:46, 36:44] = 32  # right lung: lower, middle, upper lobe from foot to head
    mask[4:30, 10:46, 44:50] = 31
    mask[4:30, 10:46, 50:62] = 30
    mask[34:60, 10:46, 36:48] = 29  # left lung: lower, upper
    mask[34:60, 10:46, 48:62] = 28
    for i, label in enumerate(range(33, 38)):  # vertebrae L5 (33) .. L1 (37), 8 slices each
        mask[28:37, 46:55, 8 + 8 * i : 15 + 8 * i] = label
    return mask


# one tumour per rule, well inside its host
TUMOURS = {
    26: ((20, 30, 20), 5),  # liver
    23: ((17, 28, 47), 4),  # right lung, across the middle lobe's borders
    24: ((44, 20, 16), 3),  # pancreas
    27: ((48, 32, 8), 3),  # colon
    128: ((32, 50, 27), 3),  # vertebra L3
}


def _with_tumour(tumour: int, mask: np.ndarray | None = None) -> np.ndarray:
    mask = _phantom() if mask is None else mask.copy()
    centre, radius = TUMOURS[tumour]
    mask[_ball(centre, radius)] = tumour
    return mask


def _check_tumour_rule(mask: np.ndarray, out: np.ndarray, record: dict, rule: TumourRule) -> None:
    """Everything a user relies on after a tumour rule, asserted on the arrays themselves."""
    assert out.shape == mask.shape and out.dtype == mask.dtype
    assert record["rule"] == rule.name and record["accepted"], record
    old, new = mask == rule.tumour, out == rule.tumour
    writable = np.isin(mask, rule.hosts) | old
    assert not (new & ~writable).any(), "tumour voxels outside its host"
    before, after = int(old.sum()), int(new.sum())
    assert after >= rule.ratio_at(record["tries"]) * before, (after, before)
    assert (record["tumour_voxels_before"], record["tumour_voxels_after"]) == (before, after)
    assert np.array_equal(out[~writable], mask[~writable]), "a label other than tumour or host changed"
    assert (out[old & ~new] == record["refill_label"]).all(), "old tumour voxels not refilled with the host"
    host_kept = np.isin(mask, rule.hosts) & ~new
    assert np.array_equal(out[host_kept], mask[host_kept])


def test_first_matching_rule_in_maisis_order():
    assert rule_for([0, 1, 26, 128, 200]).tumour == 128
    assert rule_for([23, 26, 27]).tumour == 26
    assert rule_for([23, 24]).tumour == 23
    assert rule_for([24, 27]).tumour == 24
    assert rule_for([27, 62]).tumour == 27
    assert rule_for([1, 4, 62, 200]) is None


def test_rules_carry_maisis_figures():
    assert RULE[128].translate == (5, 5, 0) and RULE[128].rotate == (0, 0, 0.1) and RULE[128].warp == "affine"
    assert [RULE[t].refill for t in (26, 23, 24, 27, 128)] == [1, None, 4, 62, 200]
    assert [RULE[t].min_ratio for t in (26, 23, 24, 27, 128)] == [0.8, 0.85, 0.8, 0.8, 0.8]
    assert RULE[27].ratio_at(20) == 0.8 and RULE[27].ratio_at(21) == 0.75
    assert RULE[128].ratio_at(41) == 0.75 and RULE[26].ratio_at(59) == 0.8
    assert set(BONES) >= {33, 56, 63, 97, 114, 127} and 128 not in BONES


def test_liver_tumour_stays_in_liver_over_12_seeds():
    mask = _with_tumour(26)
    centres = set()
    for seed in range(12):
        out, record = augment_mask(mask, seed=seed)
        _check_tumour_rule(mask, out, record, RULE[26])
        centres.add(tuple(np.round(ndimage.center_of_mass(out == 26)).astype(int)))
    assert len(centres) > 6  # the tumour really moves, differently per seed


def test_bone_lesion_stays_in_bone_over_50_seeds():
    mask = _with_tumour(128)
    for seed in range(50):
        out, record = augment_mask(mask, seed=seed)
        _check_tumour_rule(mask, out, record, RULE[128])
        assert (out[(mask == 128) & (out != 128)] == 200).all()  # MAISI refills a bone lesion with body


@pytest.mark.parametrize("tumour", [23, 24, 27])
def test_other_tumours_stay_in_host_over_4_seeds(tumour: int):
    mask = _with_tumour(tumour)
    moved = 0
    for seed in range(4):
        out, record = augment_mask(mask, seed=seed)
        _check_tumour_rule(mask, out, record, RULE[tumour])
        moved += not np.array_equal(out == tumour, mask == tumour)
    assert moved >= 3


@pytest.mark.slow
@pytest.mark.parametrize("tumour", [26, 23, 24, 27])
def test_every_tumour_stays_in_host_over_50_seeds(tumour: int):
    mask = _with_tumour(tumour)
    for seed in range(50):
        out, record = augment_mask(mask, seed=seed)
        _check_tumour_rule(mask, out, record, RULE[tumour])


def test_refill_uses_the_host_id():
    for tumour, host in ((26, 1), (24, 4), (27, 62), (128, 200)):
        mask = _with_tumour(tumour)
        out, record = augment_mask(mask, seed=3)
        assert record["refill_label"] == host
        vacated = (mask == tumour) & (out != tumour)
        assert vacated.any() and (out[vacated] == host).all(), tumour


def test_lung_tumour_refill_is_the_most_common_neighbouring_lobe():
    mask = _with_tumour(23)
    tumour = mask == 23
    ring = ndimage.binary_dilation(tumour, np.ones((3, 3, 3), bool)) & ~tumour
    lobes, counts = np.unique(mask[ring & np.isin(mask, LUNG_LOBES)], return_counts=True)
    assert len(lobes) >= 2  # the test means something: the tumour touches several lobes
    expected = int(lobes[np.argmax(counts)])
    out, record = augment_mask(mask, seed=0)
    assert record["refill_label"] == expected
    vacated = tumour & (out != 23)
    assert vacated.any() and (out[vacated] == expected).all()


def test_lung_tumour_without_lobes_is_left_alone():
    mask = _phantom()
    mask[np.isin(mask, LUNG_LOBES)] = 200
    mask[_ball((17, 28, 47), 4)] = 23
    out, record = augment_mask(mask, seed=0)
    assert np.array_equal(out, mask) and not record["accepted"]
    assert "no host label" in record["reason"] and record["tries"] == 0


def test_same_seed_same_mask_other_seed_another():
    mask = _with_tumour(26)
    first, rec1 = augment_mask(mask, seed=7)
    again, rec2 = augment_mask(mask.copy(), seed=7)
    other, _ = augment_mask(mask, seed=8)
    assert np.array_equal(first, again) and rec1 == rec2
    assert not np.array_equal(first, other)


def test_only_the_first_rule_applies():
    mask = _with_tumour(27, _with_tumour(26))  # liver tumour wins; the colon tumour stays where it is
    out, record = augment_mask(mask, seed=1)
    assert record["rule"] == "hepatic tumor"
    assert np.array_equal(out == 27, mask == 27)


def test_no_accepted_draw_returns_the_mask_unchanged():
    mask = _phantom()
    mask[mask == 1] = 200  # no liver: the tumour's only host is its own footprint, a 1-voxel line
    mask[6:36, 30, 20] = 26
    out, record = augment_mask(mask, seed=0, max_tries=3)
    assert np.array_equal(out, mask)
    assert not record["accepted"] and record["tries"] == 3
    assert "unchanged" in record["reason"] and record["tumour_voxels_after"] == 30


def test_body_zoom_keeps_shape_dtype_and_labels():
    mask = _phantom().astype(np.int16)
    changed = 0
    for seed in range(6):
        out, record = augment_mask(mask, seed=seed)
        assert record["rule"] == "body zoom" and record["warp"] == "RandZoom" and record["accepted"]
        zoom = record["params"]["zoom"]
        assert len(zoom) == 3 and all(0.99 <= z <= 1.01 for z in zoom)
        assert out.shape == mask.shape and out.dtype == mask.dtype
        assert set(np.unique(out)) == set(np.unique(mask))
        assert record["changed_voxels"] == int((out != mask).sum())
        changed += record["changed_voxels"] > 0
    assert changed > 0  # some draw zooms enough to move a 64-voxel axis


def test_record_is_json_ready():
    _, record = augment_mask(_with_tumour(128), seed=2)
    again = json.loads(json.dumps(record))
    assert again == record
    assert again["warp"] == "RandAffine" and again["seed"] == 2 and again["device"] == "cpu"
    assert set(again["params"]) == {"rotate", "translate", "scale"}
    assert again["params"]["translate"][2] == 0.0 and abs(again["params"]["rotate"][2]) <= 0.1


@pytest.mark.parametrize(
    "mask, kwargs, message",
    [
        (np.zeros((8, 8), np.uint8), {"seed": 0}, "mask: expected a 3D integer array"),
        (np.zeros((8, 8, 8), np.float32), {"seed": 0}, "float32"),
        (np.zeros((8, 8, 8), np.uint8), {"seed": -1}, "seed"),
        (np.zeros((8, 8, 8), np.uint8), {"seed": 1.5}, "seed"),
        (np.zeros((8, 8, 8), np.uint8), {"seed": 0, "max_tries": 0}, "max_tries"),
    ],
)
def test_bad_input_is_named(mask, kwargs, message):
    with pytest.raises(InputError, match=message):
        augment_mask(mask, **kwargs)


@pytest.fixture(scope="module")
def real_mask_with_liver_tumour() -> np.ndarray:
    """TotalSegmentator example (3 mm, 122 x 101 x 30) in MAISI ids, a 4-voxel-radius ball in its liver."""
    seg = read_mask(DATA / "totalseg_example_seg.nii.gz").array
    mask, _ = remap(seg, load_mapping("totalsegmentator", load_label_dict()))
    depth = ndimage.distance_transform_edt(mask == 1)
    centre = np.unravel_index(np.argmax(depth), mask.shape)
    assert depth[centre] > 4
    mask[_ball(centre, 4, mask.shape) & (mask == 1)] = 26
    return mask


def test_real_mask_liver_tumour_stays_in_liver(real_mask_with_liver_tumour: np.ndarray):
    mask = real_mask_with_liver_tumour
    for seed in range(4):
        out, record = augment_mask(mask, seed=seed)
        _check_tumour_rule(mask, out, record, RULE[26])


@pytest.mark.slow
def test_real_mask_liver_tumour_over_50_seeds(real_mask_with_liver_tumour: np.ndarray):
    mask = real_mask_with_liver_tumour
    for seed in range(50):
        out, record = augment_mask(mask, seed=seed)
        _check_tumour_rule(mask, out, record, RULE[26])


@pytest.mark.gpu
def test_gpu_matches_the_rules_and_is_deterministic():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for tumour in (26, 23, 128):
        mask = _with_tumour(tumour)
        out, record = augment_mask(mask, seed=5, device="cuda")
        assert record["device"].startswith("cuda")
        _check_tumour_rule(mask, out, record, RULE[tumour])
        again, _ = augment_mask(mask, seed=5, device="cuda")
        assert np.array_equal(out, again)
    zoomed, record = augment_mask(_phantom(), seed=5, device="cuda")
    assert zoomed.shape == SHAPE and record["rule"] == "body zoom"
