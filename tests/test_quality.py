"""HU check and mask fidelity on real CT: the reference numbers synthetic CT is judged against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import Volume, read_mask, read_volume
from maisi.errors import InputError
from maisi.evaluation.quality import hu_check, label_hu_table, mask_fidelity, reference_ranges
from maisi.labels import load_label_dict
from maisi.labels.envelope import add_body_label
from maisi.labels.mapping import load_mapping, remap

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def abdomen() -> tuple[Volume, Volume]:
    """TotalSegmentator's example abdomen CT with its labels in MAISI ids and the body envelope added."""
    ct = read_volume(DATA / "totalseg_example_ct_sm.nii.gz")
    seg = read_mask(DATA / "totalseg_example_seg.nii.gz")
    ids, _ = remap(seg.array, load_mapping("totalsegmentator", load_label_dict()))
    mask, _ = add_body_label(seg.with_array(ids), ct)
    return ct, mask


@pytest.fixture(scope="module")
def chest() -> tuple[Volume, Volume]:
    """slicerio's chest CT; its coarse lungs / ribs / thoracic spine given MAISI lobe, rib and vertebra
    ids."""
    ct = read_volume(DATA / "slicerio_CTChest4.nrrd")
    seg = read_mask(DATA / "slicerio_Segmentation.seg.nrrd")
    ids = np.zeros_like(seg.array)
    for source, target in {5: 28, 6: 31, 1: 63, 3: 40}.items():  # right lung, left lung, ribs, thoracic spine
        ids[seg.array == source] = target
    mask, _ = add_body_label(seg.with_array(ids), ct)
    return ct, mask


def shifted(mask: Volume, voxels: int) -> Volume:
    return mask.with_array(np.roll(mask.array, voxels, axis=0))


def test_reference_ranges_include_lung_lobe_32_and_all_seven_organs():
    ranges = reference_ranges()
    assert set(ranges) == {"liver", "spleen", "pancreas", "kidney", "lung", "bone", "brain"}
    low, high = ranges["lung"]
    assert low < -800 and -500 < high < -300


def test_real_abdomen_ct_passes_the_hu_check_for_its_organs(abdomen):
    ct, mask = abdomen
    result = hu_check(ct, mask)
    assert result.passed, result.to_json()
    assert {o.organ for o in result.organs} == {"liver", "spleen", "pancreas", "kidney", "lung", "bone"}
    medians = {o.organ: o.median_hu for o in result.organs}
    assert 30 < medians["liver"] < 70 and medians["lung"] < -700  # measured 46 and -789


def test_liver_at_minus_500_fails_and_is_named(abdomen):
    ct, mask = abdomen
    broken = ct.array.copy()
    broken[mask.array == 1] = -500
    result = hu_check(ct.with_array(broken), mask)
    assert not result.passed and result.failed == ["liver"]
    report = result.to_json()
    assert report["failed"] == ["liver"] and report["organs"]["liver"]["median_hu"] == -500
    assert report["organs"]["spleen"]["passed"]


def test_lung_lobe_32_alone_is_checked(abdomen):
    ct, _ = abdomen
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[40:60, 40:60, 10:20] = 32
    result = hu_check(ct.with_array(np.full(ct.shape, 40, dtype=np.int16)), ct.with_array(mask))
    assert result.failed == ["lung"]  # soft tissue where a lung should be


def test_hu_check_only_the_organs_asked_and_rejects_unknown_names(abdomen):
    ct, mask = abdomen
    assert [o.organ for o in hu_check(ct, mask, ["liver", "brain"]).organs] == [
        "liver"
    ]  # no brain in the mask
    with pytest.raises(InputError, match="heart"):
        hu_check(ct, mask, ["liver", "heart"])


def test_mismatched_grids_are_refused(abdomen):
    ct, mask = abdomen
    cropped = Volume(mask.array[:-1], mask.affine)
    with pytest.raises(InputError, match="grids differ"):
        hu_check(ct, cropped)
    with pytest.raises(InputError, match="grids differ"):
        mask_fidelity(ct, cropped)


def test_fidelity_of_real_chest_ct_to_its_own_labels_is_high(chest):
    ct, mask = chest
    scores = mask_fidelity(ct, mask)
    # measured: body 1.00 (the envelope comes from this CT), lung 0.962, bone 0.502
    assert scores["body"] >= 0.95 and scores["lung"] >= 0.90 and scores["bone"] >= 0.40


def test_fidelity_drops_for_a_shifted_mask(chest):
    ct, mask = chest
    own = mask_fidelity(ct, mask)
    moved = mask_fidelity(
        ct, shifted(mask, 10)
    )  # 30 mm to the side; measured body 0.89, lung 0.58, bone 0.08
    assert moved["lung"] < own["lung"] - 0.25 and moved["body"] < own["body"] - 0.05 and moved["bone"] < 0.2


def test_fidelity_on_abdomen_and_absent_structures(abdomen):
    ct, mask = abdomen
    scores = mask_fidelity(ct, mask)
    assert scores["body"] >= 0.95 and scores["lung"] >= 0.6  # lung bases only at 3 mm; measured 0.675
    only_body = mask.with_array(np.where(mask.array > 0, 200, 0).astype(np.uint8))
    assert mask_fidelity(ct, only_body)["lung"] is None and mask_fidelity(ct, only_body)["bone"] is None


def test_label_hu_table_names_labels_and_gives_median_and_iqr(abdomen):
    ct, mask = abdomen
    table = label_hu_table(ct, mask, load_label_dict())
    liver = table["liver"]
    assert liver["id"] == 1 and liver["voxels"] == int((mask.array == 1).sum())
    assert liver["median_hu"] == float(np.median(ct.array[mask.array == 1])) and 0 < liver["iqr_hu"] < 100
    assert "body" in table and all(entry["id"] != 0 for entry in table.values())


def test_mask_without_a_checked_organ_is_not_checked_rather_than_passed(chest):
    ct, mask = chest
    tumour_and_body = np.where(mask.array > 0, 200, 0).astype(np.uint8)
    tumour_and_body[60:80, 60:80, 20:30] = 23  # lung tumour: not one of the checked organs
    result = hu_check(ct, mask.with_array(tumour_and_body))
    assert result.organs == () and result.passed is None and result.failed == []
    report = result.to_json()
    assert report["passed"] is None and "no checked organ" in report["reason"] and "liver" in report["reason"]
    only = hu_check(ct, mask, ["brain"])  # an organ list none of which is in the mask
    assert only.passed is None and only.reason == "no checked organ (brain) has 10 or more voxels in the mask"
    assert "reason" not in hu_check(ct, mask).to_json()  # judged organs: no reason
