"""Label dictionaries: the packaged MAISI one, user files with mistakes, masks with unknown labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maisi.errors import InputError
from maisi.labels import (
    BODY_LABEL,
    add_class,
    free_ids,
    labels_not_in_dict,
    load_label_dict,
    validate_label_dict,
)


@pytest.fixture(scope="module")
def maisi_dict() -> dict[str, int]:
    return load_label_dict()


def test_packaged_maisi_dictionary(maisi_dict):
    assert len(maisi_dict) == 133  # 132 classes + body
    assert BODY_LABEL == 200
    assert maisi_dict["body"] == 200
    assert maisi_dict["liver"] == 1
    assert maisi_dict["airway"] == 132
    dummies = {name: i for name, i in maisi_dict.items() if name.startswith("dummy")}
    assert dummies == {
        "dummy1": 2,
        "dummy2": 16,
        "dummy3": 18,
        "dummy4": 20,
        "dummy5": 21,
        "dummy6": 129,
        "dummy7": 130,
        "dummy8": 131,
    }
    assert all(type(i) is int for i in maisi_dict.values())
    assert len(set(maisi_dict.values())) == 133  # no id used twice
    assert set(maisi_dict.values()) - {200} == set(range(1, 133))


def test_valid_user_dictionary_loads(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"liver": 1, "spleen": 3, "my new tumour": 2, "body": 200}))
    assert load_label_dict(path) == {"liver": 1, "spleen": 3, "my new tumour": 2, "body": 200}


BROKEN = {
    "duplicated name": ('{"liver": 1, "spleen": 3, "liver": 4}', ["liver", "duplicate"]),
    "duplicated id": ('{"liver": 1, "spleen": 3, "gallbladder": 3}', ["gallbladder", "spleen", "3"]),
    "id above 255": ('{"liver": 1, "kidney cyst": 256}', ["kidney cyst", "256"]),
    "id 0 is background": ('{"liver": 1, "background": 0}', ["background", "0"]),
    "negative id": ('{"liver": 1, "stomach": -12}', ["stomach", "-12"]),
    "float id": ('{"liver": 1, "pancreas": 4.0}', ["pancreas", "4.0", "integer"]),
    "string id": ('{"liver": 1, "pancreas": "4"}', ["pancreas", "integer"]),
    "boolean id": ('{"liver": 1, "pancreas": true}', ["pancreas", "integer"]),
    "body not 200": ('{"liver": 1, "body": 201}', ["body", "201", "200"]),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_dictionary_names_the_offending_class(tmp_path, case):
    text, expected = BROKEN[case]
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_label_dict(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_every_problem_is_listed_at_once(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"liver": 1, "kidney cyst": 300, "pancreas": "four", "gallbladder": 1, "body": 100}')
    with pytest.raises(InputError) as info:
        load_label_dict(path)
    message = str(info.value)
    for fragment in ["kidney cyst", "300", "pancreas", "gallbladder", "body", "100"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_two_problems_are_both_named():
    with pytest.raises(InputError) as info:
        validate_label_dict({"liver": 1, "left lung": 256, "right lung": 1.5}, "my_labels.json")
    message = str(info.value)
    assert "my_labels.json" in message
    assert "left lung" in message and "right lung" in message


def test_duplicated_name_and_other_problems_are_listed_together(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"liver": 1, "liver": 2, "spleen": 300, "stomach": 3, "stomach": 4}')
    with pytest.raises(InputError) as info:
        load_label_dict(path)
    message = str(info.value)
    assert "liver" in message and "stomach" in message and "spleen" in message


def test_unreadable_dictionary_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_label_dict(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"liver": 1,}')
    with pytest.raises(InputError, match="bad.json"):
        load_label_dict(bad_json)
    a_list = tmp_path / "list.json"
    a_list.write_text('["liver", "spleen"]')
    with pytest.raises(InputError, match="list.json"):
        load_label_dict(a_list)


def test_labels_not_in_dict(maisi_dict):
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[0, 0, 0] = 1
    mask[1, 1, 1] = 200
    mask[2, 2, 2] = 250
    mask[3, 3, 3] = 250
    assert labels_not_in_dict(mask, maisi_dict) == [250]
    assert labels_not_in_dict(np.zeros((2, 2, 2), np.int32), maisi_dict) == []
    unknown = labels_not_in_dict(np.array([[[0, 133, 5, 255, 199]]], dtype=np.int16), maisi_dict)
    assert unknown == [133, 199, 255] and all(type(v) is int for v in unknown)


def test_dummy_slot_that_was_a_region_marker_is_handed_out_last(maisi_dict):
    """dummy1 (id 2) was an abdomen marker of body-region derivation: new classes go elsewhere first."""
    assert free_ids(maisi_dict)[:8] == [16, 18, 20, 21, 129, 130, 131, 2]
    label_dict, taken = dict(maisi_dict), []
    for k in range(8):
        label_dict, new_id = add_class(label_dict, f"class {k}")
        taken.append(new_id)
    assert taken == [16, 18, 20, 21, 129, 130, 131, 2]
    assert add_class(label_dict, "ninth")[1] == 133  # then the first unused id
    assert add_class(maisi_dict, "asked for", 2)[1] == 2  # still free to take on request
