"""The packaged label mappings (``maisi/resources/mappings/*.json``): structure, targets, and real masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import maisi.resources
from maisi.data.io import read_mask
from maisi.labels import BODY_LABEL, load_label_dict

MAPPINGS = Path(maisi.resources.__file__).parent / "mappings"
MAPPING_FILES = sorted(MAPPINGS.glob("*.json"))
DATA = Path(__file__).parent / "data"
TS_FILE = MAPPINGS / "totalsegmentator_total_v2.json"
SLICER_FILE = MAPPINGS / "slicerio_chest_sample.json"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _targets(path: Path) -> dict[int, str | None]:
    return {e["source_id"]: e["target"] for e in _load(path)["mapping"]}


def _remap(mask: np.ndarray, path: Path) -> np.ndarray:
    """Source ids -> MAISI ids with a lookup table (unmapped classes -> 0)."""
    label_dict = load_label_dict()
    lut = np.zeros(256, dtype=np.uint8)
    for sid, target in _targets(path).items():
        if target is not None:
            lut[sid] = label_dict[target]
    return lut[mask]


@pytest.fixture(scope="module")
def label_dict() -> dict[str, int]:
    return load_label_dict()


def test_mapping_files_exist():
    names = {p.name for p in MAPPING_FILES}
    assert {TS_FILE.name, SLICER_FILE.name} <= names


@pytest.mark.parametrize("path", MAPPING_FILES, ids=lambda p: p.stem)
def test_mapping_file_structure(path: Path, label_dict: dict[str, int]):
    data = _load(path)
    assert set(data) == {"description", "source", "mapping"}
    assert isinstance(data["description"], str) and data["description"]
    assert isinstance(data["source"], str) and data["source"]
    entries = data["mapping"]
    assert isinstance(entries, list) and entries
    ids = []
    for entry in entries:
        assert set(entry) <= {"source_id", "source_name", "target", "note"}, entry
        assert {"source_id", "source_name", "target"} <= set(entry), entry
        sid = entry["source_id"]
        assert isinstance(sid, int) and not isinstance(sid, bool) and 1 <= sid <= 255, entry
        assert isinstance(entry["source_name"], str) and entry["source_name"], entry
        target = entry["target"]
        if target is None:
            assert isinstance(entry.get("note"), str) and entry["note"].strip(), (
                f"null target without a note: {entry}"
            )
        else:
            assert target in label_dict, f"{entry}: target is not a MAISI class name"
            assert not target.startswith("dummy"), entry
        if "note" in entry:
            assert isinstance(entry["note"], str) and entry["note"].strip(), entry
        ids.append(sid)
    assert len(ids) == len(set(ids)), "duplicate source_id"
    assert ids == sorted(ids), "entries are not in source id order"
    names = [e["source_name"] for e in entries]
    assert len(names) == len(set(names)), "duplicate source_name"


def test_packaged_loader_accepts_every_mapping(label_dict: dict[str, int]):
    from maisi.labels.mapping import load_mapping

    for path in MAPPING_FILES:
        mapping = load_mapping(str(path), label_dict)
        assert set(mapping.targets) == set(_targets(path))


def test_totalsegmentator_covers_ids_1_to_n():
    ids = [e["source_id"] for e in _load(TS_FILE)["mapping"]]
    assert ids == list(range(1, len(ids) + 1))
    assert len(ids) == 117  # class_map["total"] of totalsegmentator 2.18.0


def test_totalsegmentator_known_pairs():
    entries = {e["source_name"]: (e["source_id"], e["target"]) for e in _load(TS_FILE)["mapping"]}
    expected = {
        "spleen": (1, "spleen"),
        "kidney_right": (2, "right kidney"),
        "kidney_left": (3, "left kidney"),
        "liver": (5, "liver"),
        "lung_upper_lobe_left": (10, "left lung upper lobe"),
        "lung_middle_lobe_right": (13, "right lung middle lobe"),
        "lung_lower_lobe_right": (14, "right lung lower lobe"),
        "urinary_bladder": (21, "bladder"),
        "vertebrae_L5": (27, "vertebrae L5"),
        "vertebrae_C1": (50, "vertebrae C1"),
        "heart": (51, "heart"),
        "aorta": (52, "aorta"),
        "inferior_vena_cava": (63, "inferior vena cava"),
        "portal_vein_and_splenic_vein": (64, "portal vein and splenic vein"),
        "iliac_vena_left": (67, "left iliac vena"),
        "femur_left": (75, "left femur"),
        "hip_right": (78, "right hip"),
        "brain": (90, "brain"),
        "skull": (91, "skull"),
        "rib_left_1": (92, "left rib 1"),
        "rib_right_12": (115, "right rib 12"),
        "costal_cartilages": (117, "costal cartilages"),
    }
    for name, pair in expected.items():
        assert entries[name] == pair, name


def test_totalsegmentator_sides_are_not_swapped():
    for entry in _load(TS_FILE)["mapping"]:
        name, target = entry["source_name"], entry["target"] or ""
        for side, other in (("left", "right"), ("right", "left")):
            if side in name.split("_"):
                assert side in target.split() and other not in target.split(), entry


def test_totalsegmentator_targets_are_distinct():
    # every TS 'total' class has its own MAISI class: no two anatomies are merged
    targets = [t for t in _targets(TS_FILE).values() if t is not None]
    assert len(targets) == len(set(targets))


def test_totalsegmentator_example_segmentation(label_dict: dict[str, int]):
    mask = read_mask(DATA / "totalseg_example_seg.nii.gz").array
    targets = _targets(TS_FILE)
    present = sorted(int(v) for v in np.unique(mask) if v != 0)
    assert present[:3] == [1, 2, 3] and len(present) == 41  # abdomen CT: organs, lower thoracic spine, ribs
    missing = [i for i in present if i not in targets]
    assert not missing, f"ids in the TotalSegmentator example without a mapping entry: {missing}"
    mapped = {targets[i] for i in present}
    assert None not in mapped
    abdominal = {
        "liver",
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "stomach",
        "pancreas",
        "right adrenal gland",
        "left adrenal gland",
        "small bowel",
        "duodenum",
        "colon",
        "aorta",
        "inferior vena cava",
        "portal vein and splenic vein",
    }
    assert abdominal <= mapped
    assert {"vertebrae L1", "vertebrae T12", "left rib 7", "right rib 12", "costal cartilages"} <= mapped

    remapped = _remap(mask, TS_FILE)
    for ts_id, name in ((5, "liver"), (1, "spleen"), (2, "right kidney"), (3, "left kidney"), (52, "aorta")):
        assert np.array_equal(remapped == label_dict[name], mask == ts_id), name
    assert np.array_equal(remapped == 0, mask == 0)


def test_slicerio_sample_segmentation(label_dict: dict[str, int]):
    entries = {e["source_id"]: e for e in _load(SLICER_FILE)["mapping"]}
    assert [entries[i]["source_name"] for i in range(1, 8)] == [
        "ribs",
        "cervical vertebral column",
        "thoracic vertebral column",
        "lumbar vertebral column",
        "right lung",
        "left lung",
        "tissue",
    ]
    assert entries[7]["target"] == "body" and label_dict["body"] == BODY_LABEL
    assert all(entries[i]["target"] is None for i in range(1, 7))

    mask = read_mask(DATA / "slicerio_Segmentation.seg.nrrd").array
    present = {int(v) for v in np.unique(mask) if v != 0}
    assert present == set(entries)
    remapped = _remap(mask, SLICER_FILE)
    assert set(np.unique(remapped).tolist()) == {0, BODY_LABEL}
    assert np.array_equal(remapped == BODY_LABEL, mask == 7)
