"""MAISI's post-processing of generated masks on crafted masks: what each step must remove, return or keep."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from maisi.masks.postprocess import CUBE, _closed, _dilated, postprocess_generated_mask

BODY, LIVER, PANCREAS, STOMACH, COLON, LOBE = 200, 1, 4, 12, 62, 30
VESSEL, LUNG_TUMOUR, PANC_TUMOUR, HEP_TUMOUR = 25, 23, 24, 26


def _body(shape=(40, 40, 40)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:37, 3:37, 3:37] = BODY
    return mask


def _run(mask, target=None):
    out, record = postprocess_generated_mask(mask, target)
    assert out.shape == mask.shape and out.dtype == mask.dtype
    return out, record["changed_voxels"]


def test_stray_body_and_stray_organ_components_are_removed():
    mask = _body()
    mask[0:5, 38:40, 0:5] = BODY  # a loose piece of body outside the main one (touches the volume edge)
    mask[8:20, 8:20, 8:20] = LIVER
    mask[28:31, 28:31, 28:31] = LIVER  # a second, smaller liver
    out, changed = _run(mask)
    assert not out[0:5, 38:40, 0:5].any()
    assert (out[28:31, 28:31, 28:31] == BODY).all()
    assert (out[8:20, 8:20, 8:20] == LIVER).all()
    assert changed["body"] == 50 and changed["organ_components"] == 27
    assert out[10, 30, 30] == BODY and out[20, 5, 5] == BODY  # the body itself is intact


def test_non_target_tumours_return_to_their_host():
    mask = _body()
    mask[8:20, 8:20, 8:20] = LIVER
    mask[12:15, 12:15, 12:15] = HEP_TUMOUR
    mask[24:32, 8:16, 8:16] = PANCREAS
    mask[27:29, 10:12, 10:12] = PANC_TUMOUR
    mask[8:20, 22:34, 22:34] = LOBE  # right lung lower lobe
    mask[12:14, 26:28, 26:28] = LUNG_TUMOUR
    out, changed = _run(mask, target=None)
    assert (out[8:20, 8:20, 8:20] == LIVER).all()
    assert (out[24:32, 8:16, 8:16] == PANCREAS).all()
    # MAISI writes lobe 28 (left upper) for every lung tumour; we return it to the lobe around it
    assert (out[8:20, 22:34, 22:34] == LOBE).all()
    assert changed["tumours"] == 27 + 8 + 8


def test_target_tumour_is_kept_and_reduced_to_its_largest_component():
    mask = _body()
    mask[8:30, 8:30, 8:30] = LOBE
    mask[10:13, 10:13, 10:13] = LUNG_TUMOUR  # the tumour
    mask[24:26, 24:26, 24:26] = LUNG_TUMOUR  # a smaller second piece
    out, _ = _run(mask, target=LUNG_TUMOUR)
    assert (out[10:13, 10:13, 10:13] == LUNG_TUMOUR).all()
    assert np.count_nonzero(out == LUNG_TUMOUR) == 27
    assert (out[24:26, 24:26, 24:26] == LOBE).all()  # body first, then filled by the lobe's closing


def test_hepatic_tumour_target_keeps_every_piece_and_survives_the_liver_fill():
    mask = _body()
    mask[8:24, 8:24, 8:24] = LIVER
    mask[12, 12, 12] = HEP_TUMOUR  # one voxel: the liver's closing fills it, the restore brings it back
    mask[18:21, 18:21, 18:21] = HEP_TUMOUR
    out, _ = _run(mask, target=HEP_TUMOUR)
    assert out[12, 12, 12] == HEP_TUMOUR and (out[18:21, 18:21, 18:21] == HEP_TUMOUR).all()
    assert np.count_nonzero(out == HEP_TUMOUR) == 28


def test_hepatic_vessel_becomes_liver_and_organ_holes_are_filled():
    mask = _body()
    mask[8:20, 8:20, 8:20] = LIVER
    mask[10:18, 13:16, 13:16] = VESSEL  # thick enough that the liver's closing leaves it
    mask[16, 10, 10] = BODY  # a one-voxel hole in the liver
    out, changed = _run(mask)
    assert (out[8:20, 8:20, 8:20] == LIVER).all()
    assert changed["organ_fill"] == 1 and changed["vessel_airway_tumour_restore"] == 72


def test_bowel_pieces_away_from_the_bowel_are_removed():
    mask = _body()
    mask[8:16, 8:16, 8:16] = STOMACH
    mask[16:24, 8:16, 8:16] = COLON  # touches the stomach: one bowel
    mask[28:32, 28:32, 28:32] = COLON  # a loose piece of colon
    out, changed = _run(mask)
    assert (out[28:32, 28:32, 28:32] == BODY).all()
    assert (out[16:24, 8:16, 8:16] == COLON).all() and changed["bowel"] == 64


def test_a_clean_mask_is_left_as_it_is():
    mask = _body()
    mask[8:20, 8:20, 8:20] = LIVER
    mask[24:32, 8:16, 8:16] = PANCREAS
    out, changed = _run(mask)
    assert np.array_equal(out, mask) and set(changed.values()) == {0}


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_box_closing_and_dilation_equal_the_whole_volume_ones(rounds):
    rng = np.random.default_rng(rounds)
    binary = np.zeros((20, 18, 16), dtype=bool)
    binary[0:6, 3:9, 10:16] = rng.random((6, 6, 6)) > 0.4  # touches three volume faces
    binary[12:15, 12:15, 2:5] = rng.random((3, 3, 3)) > 0.3
    whole = binary.copy()
    for _ in range(rounds):
        whole = ndimage.binary_erosion(ndimage.binary_dilation(whole, CUBE), CUBE, border_value=0)
    assert np.array_equal(_closed(binary, rounds), whole)
    assert np.array_equal(_dilated(binary, rounds), ndimage.binary_dilation(binary, CUBE, iterations=rounds))
    assert not _closed(np.zeros_like(binary)).any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="target_tumour 7"):
        postprocess_generated_mask(_body(), 7)
    with pytest.raises(ValueError, match="3D"):
        postprocess_generated_mask(np.zeros((4, 4), dtype=np.uint8))


def test_the_gallbladder_takes_back_what_a_later_fill_took_as_maisis_second_gallbladder_fill_does():
    # A gallbladder sheet (1 voxel thick) sandwiched by two 2 x 2 spleen plates joined through a hole in it:
    # the gallbladder's fill closes the hole, the spleen's fill (after it) closes the gap between its plates
    # and takes 2 x 2 of the sheet, and MAISI's second gallbladder fill closes that hole again.
    spleen = 3
    mask = _body()
    mask[10:30, 10:30, 20] = 10
    mask[19:21, 19:21, 19] = spleen
    mask[19:21, 19:21, 21] = spleen
    mask[19, 19, 20] = spleen  # the plates' link through the sheet
    out, _ = _run(mask)
    assert (out[10:30, 10:30, 20] == 10).all()  # the sheet whole again
    assert (out[19:21, 19:21, 19] == spleen).all() and (out[19:21, 19:21, 21] == spleen).all()
