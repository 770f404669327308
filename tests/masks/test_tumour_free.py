"""Tumour-free masks: each tumour becomes its host (MAISI's rules, kidney mass 129, declared hosts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maisi.errors import InputError
from maisi.labels import HOSTS_KEY, add_class, load_label_dict
from maisi.labels.__main__ import main as labels_main
from maisi.masks.tumour_free import remove_tumors, require_hosts, tumour_hosts


@pytest.fixture(scope="module")
def maisi_dict():
    return load_label_dict()


def _organ_with_tumour(organ: int, tumour: int) -> np.ndarray:
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[2:10, 2:10, 2:10] = organ
    mask[4:7, 4:7, 4:7] = tumour
    return mask


@pytest.mark.parametrize(
    ("tumour", "host"),
    [(26, 1), (24, 4), (27, 62), (116, 14), (117, 5)],
    ids=["hepatic->liver", "pancreatic->pancreas", "colon primaries->colon", "left cyst", "right cyst"],
)
def test_single_host_tumours_become_their_organ(maisi_dict, tumour, host):
    mask = _organ_with_tumour(host, tumour)
    before = mask.copy()
    out = remove_tumors(mask, maisi_dict)
    assert np.array_equal(mask, before)  # input untouched
    assert out.dtype == mask.dtype and out.shape == mask.shape
    assert not (out == tumour).any()
    assert np.array_equal(out, np.where(mask == tumour, host, mask))


def test_lung_tumour_takes_the_majority_neighbouring_lobe_per_tumour(maisi_dict):
    mask = np.zeros((20, 12, 12), dtype=np.int16)
    mask[:10, :, :6] = 30  # right upper lobe, the larger share around the first tumour
    mask[:10, :, 6:] = 31  # right middle lobe
    mask[10:, :, :] = 28  # left upper lobe
    mask[3:6, 4:7, 3:7] = 23  # straddles 30 and 31, touching 30 on more voxels
    mask[14:17, 4:7, 4:7] = 23  # inside the left lung: a single vote over the class would say 30
    out = remove_tumors(mask, maisi_dict)
    assert (out[3:6, 4:7, 3:7] == 30).all()
    assert (out[14:17, 4:7, 4:7] == 28).all()
    assert np.array_equal(out[mask != 23], mask[mask != 23])


def test_lung_tumour_with_no_lobe_around_takes_the_most_common_lobe(maisi_dict):
    mask = np.full((12, 12, 12), 200, dtype=np.uint8)
    mask[:3] = 29
    mask[10:, :2] = 32
    mask[5:8, 5:8, 5:8] = 23  # surrounded by body only
    out = remove_tumors(mask, maisi_dict)
    assert (out[5:8, 5:8, 5:8] == 29).all()


def test_kidney_mass_129_becomes_the_kidney_it_lies_in(maisi_dict):
    # MAISI's own remove_tumors misses 129 (its mask generator's "kidney mass", dummy6 in the dictionary)
    assert maisi_dict["dummy6"] == 129
    mask = np.zeros((24, 12, 12), dtype=np.uint8)
    mask[:10] = 5  # right kidney
    mask[14:] = 14  # left kidney
    mask[3:6, 4:7, 4:7] = 129
    mask[17:20, 4:7, 4:7] = 129
    out = remove_tumors(mask, maisi_dict)
    assert (out[3:6, 4:7, 4:7] == 5).all() and (out[17:20, 4:7, 4:7] == 14).all()


def test_id_129_given_to_a_user_class_follows_the_user(maisi_dict):
    label_dict, label_id = add_class(maisi_dict, "thyroid nodule", 129, host=["thyroid gland"])
    assert label_id == 129
    mask = _organ_with_tumour(126, 129)
    out = remove_tumors(mask, label_dict)
    assert np.array_equal(out, np.where(mask == 129, 126, mask))


def test_bone_lesion_becomes_its_bone(maisi_dict):
    mask = _organ_with_tumour(40, 128)  # vertebra T10
    mask[:, :, 10:] = 200
    out = remove_tumors(mask, maisi_dict)
    assert np.array_equal(out, np.where(mask == 128, 40, mask))


def test_user_class_added_with_a_host_becomes_that_host(tmp_path, maisi_dict, capsys):
    path = tmp_path / "labels.json"
    assert (
        labels_main(
            ["add", "--name", "nsclc tumor", "--host", "right lung upper lobe", "--output", str(path)]
        )
        == 0
    )
    label_id = int(capsys.readouterr().out.strip())
    assert json.loads(path.read_text())[HOSTS_KEY] == {"nsclc tumor": ["right lung upper lobe"]}
    label_dict = load_label_dict(path)
    assert label_dict.hosts == {"nsclc tumor": ("right lung upper lobe",)}
    assert tumour_hosts(label_dict)[label_id] == (30,)
    mask = _organ_with_tumour(31, label_id)  # declared host wins even where another lobe surrounds it
    out = remove_tumors(mask, label_dict)
    assert np.array_equal(out, np.where(mask == label_id, 30, mask))
    # a second add keeps the first class's host
    assert labels_main(["add", "--name", "gist", "--host", "stomach", "--label-dict", str(path)]) == 0
    assert load_label_dict(path).hosts == {"nsclc tumor": ("right lung upper lobe",), "gist": ("stomach",)}


def test_user_class_with_several_hosts_takes_the_majority_neighbour(maisi_dict):
    label_dict, label_id = add_class(maisi_dict, "renal metastasis", host=["left kidney", "right kidney"])
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[:, :, :5] = 5
    mask[:, :, 5:] = 14
    mask[4:7, 4:7, 5:8] = label_id  # inside the left kidney (14)
    out = remove_tumors(mask, label_dict)
    assert (out[4:7, 4:7, 5:8] == 14).all()


def test_torch_batch_is_handled_per_sample_and_keeps_dtype():
    label_dict = load_label_dict()
    a = _organ_with_tumour(1, 26)
    b = _organ_with_tumour(30, 23)
    batch = torch.from_numpy(np.stack([a, b])[:, None].astype(np.int64))
    out = remove_tumors(batch, label_dict)
    assert out.dtype == torch.int64 and out.shape == (2, 1, 12, 12, 12)
    assert np.array_equal(out[0, 0].numpy(), remove_tumors(a, label_dict))
    assert np.array_equal(out[1, 0].numpy(), remove_tumors(b, label_dict))
    assert (batch[0, 0] == 26).any()  # input untouched


def test_tumour_like_class_without_a_host_is_refused_naming_it(maisi_dict):
    label_dict, label_id = add_class(maisi_dict, "nsclc tumor")
    with pytest.raises(InputError, match=rf"'nsclc tumor' \(id {label_id}\).*--host"):
        remove_tumors(_organ_with_tumour(30, label_id), label_dict)
    with pytest.raises(InputError, match="nsclc tumor"):
        tumour_hosts(label_dict)


def test_require_hosts_names_the_key_and_the_class(maisi_dict):
    assert require_hosts(maisi_dict, [23], "weighted_loss_label") == {23: (28, 29, 30, 31, 32)}
    with pytest.raises(InputError, match=r"weighted_loss_label: class 1 \('liver'\) has no host rule"):
        require_hosts(maisi_dict, [23, 1], "weighted_loss_label")


@pytest.mark.parametrize(
    ("hosts", "fragment"),
    [
        ({"nsclc tumor": "lung"}, "'lung' is not a class"),
        ({"nsclc tumor": "nsclc tumor"}, "its own host"),
        ({"ghost": "liver"}, "'ghost' is not a class"),
        ({"nsclc tumor": []}, "non-empty list"),
        (["liver"], "must be an object"),
    ],
)
def test_bad_declared_hosts_are_refused_naming_them(tmp_path, hosts, fragment):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"liver": 1, "nsclc tumor": 2, "body": 200, HOSTS_KEY: hosts}))
    with pytest.raises(InputError, match=fragment) as info:
        load_label_dict(path)
    assert str(path) in str(info.value)


def test_add_with_an_unknown_host_writes_nothing(tmp_path, capsys):
    path = tmp_path / "labels.json"
    code = labels_main(["add", "--name", "x tumor", "--host", "lung", "--output", str(path)])
    assert code == 2 and not path.exists()
    assert "'lung'" in capsys.readouterr().err


def test_wrong_mask_types_are_refused(maisi_dict):
    with pytest.raises(ValueError, match="integer"):
        remove_tumors(np.zeros((4, 4, 4), dtype=np.float32), maisi_dict)
    with pytest.raises(ValueError, match=r"\(N, 1, X, Y, Z\)"):
        remove_tumors(torch.zeros((4, 4, 4), dtype=torch.int64), maisi_dict)
