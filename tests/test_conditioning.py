"""Conditioning tensors equal what MAISI feeds its networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maisi.conditioning import (
    REGION_MARKER_LABELS,
    Conditions,
    binarize_labels,
    body_region_from_mask,
    modality_code,
    region_tensor,
    spacing_tensor,
)
from maisi.errors import InputError
from maisi.families.ct import get_preset
from maisi.labels import add_class, is_dummy, load_label_dict


def test_spacing_is_millimetres_times_100():
    assert torch.equal(spacing_tensor((1.5, 1.5, 2.0), batch=2), torch.tensor([[150.0, 150.0, 200.0]] * 2))


def test_region_is_one_hot_times_100_in_maisi_order():
    assert region_tensor("head_neck").tolist() == [[100.0, 0.0, 0.0, 0.0]]
    assert region_tensor("pelvis_lower").tolist() == [[0.0, 0.0, 0.0, 100.0]]


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({1, 200}, ("abdomen", "abdomen")),  # liver only
        ({28, 32, 1, 200}, ("chest", "abdomen")),  # lung lobes + liver
        ({22, 30, 93}, ("head_neck", "pelvis_lower")),  # brain, lung lobe, femur
        ({120, 14}, ("head_neck", "abdomen")),  # skull + left kidney
        ({94}, ("pelvis_lower", "pelvis_lower")),
        ({200, 6, 7}, None),  # body, aorta, IVC: no marker organ
    ],
)
def test_body_region_from_known_masks(labels, expected):
    mask = np.zeros((8, 8, len(labels) + 1), dtype=np.uint8)
    for z, label in enumerate(sorted(labels)):
        mask[2:4, 2:4, z] = label
    assert body_region_from_mask(mask) == expected


def test_labels_become_8_bit_planes_lsb_first():
    labels = torch.tensor([0, 1, 2, 3, 128, 200, 255]).view(1, 1, 7, 1, 1)
    planes = binarize_labels(labels)
    assert planes.shape == (1, 8, 7, 1, 1) and planes.dtype == torch.float32
    assert planes[0, :, 5, 0, 0].tolist() == [0, 0, 0, 1, 0, 0, 1, 1]  # 200 = 0b11001000
    weights = (2 ** torch.arange(8)).view(1, 8, 1, 1, 1).float()
    assert torch.equal((planes * weights).sum(1).flatten().long(), labels.flatten())


@pytest.mark.parametrize("bad", [torch.tensor([256]), torch.tensor([-1]), torch.tensor([1.0])])
def test_labels_outside_8_bits_or_float_are_rejected(bad):
    with pytest.raises(ValueError):
        binarize_labels(bad.view(1, 1, 1, 1, 1))


def test_modality_codes_follow_maisi_mapping():
    assert modality_code("ct") == 1 and modality_code("ct_contrast") == 3
    with pytest.raises(InputError, match="unknown modality 'xray'"):
        modality_code("xray")


def test_network_inputs_only_what_the_preset_takes():
    cond = Conditions((1.0, 1.0, 2.5), "chest", "abdomen", "ct")
    ddpm = cond.network_inputs(get_preset("maisi-ct-ddpm"), 1, torch.device("cpu"))
    assert sorted(ddpm) == ["bottom_region_index_tensor", "spacing_tensor", "top_region_index_tensor"]
    assert ddpm["top_region_index_tensor"].tolist() == [[0, 100, 0, 0]]
    assert ddpm["bottom_region_index_tensor"].tolist() == [[0, 0, 100, 0]]
    assert ddpm["spacing_tensor"].tolist() == [[100, 100, 250]]
    rflow = cond.network_inputs(get_preset("maisi-ct-rflow"), 2, torch.device("cpu"))
    assert sorted(rflow) == ["class_labels", "spacing_tensor"] and rflow["class_labels"].tolist() == [1, 1]
    with pytest.raises(InputError, match="conditioned on body region"):
        Conditions((1.0, 1.0, 1.0)).network_inputs(get_preset("tiny-ddpm"), 1, torch.device("cpu"))


def test_region_markers_are_real_organ_classes_of_maisi():
    """A dummy slot can become any new class: a marker there would put that class in a body region."""
    names = {i: n for n, i in load_label_dict().items()}
    for region, ids in REGION_MARKER_LABELS.items():
        for label_id in ids:
            assert label_id in names and not is_dummy(names[label_id]), (region, label_id)
    assert names[2] == "dummy1" and 2 not in REGION_MARKER_LABELS["abdomen"]


def test_a_class_added_with_labels_add_does_not_move_a_chest_mask_to_the_abdomen():
    label_dict, new_id = add_class(load_label_dict(), "lung nodule")
    chest = np.zeros((16, 16, 8), dtype=np.uint8)
    chest[2:14, 2:14, 1:7] = 200
    chest[3:7, 3:12, 2:6] = label_dict["left lung upper lobe"]
    chest[9:13, 3:12, 2:6] = label_dict["right lung lower lobe"]
    chest[4:6, 5:7, 3:5] = new_id  # the nodule inside the left lung
    assert body_region_from_mask(chest) == ("chest", "chest")
    # also if the new class took MAISI's dummy1 (id 2), as `add` did before issue 18
    chest[chest == new_id] = 2
    assert body_region_from_mask(chest) == ("chest", "chest")
