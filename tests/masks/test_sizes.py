"""Size requests (MAISI's check_input rules), the size table and snap, the size scale, the config keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maisi.config import load_config
from maisi.errors import ConfigError, InputError
from maisi.masks.sizes import (
    SIZE_SLOTS,
    SLOT_IDS,
    build_size_reference,
    load_size_reference,
    load_size_table,
    organ_volumes_ml,
    reference_json,
    size_of_volume,
    size_request_problems,
    size_vector,
    snap_to_table,
    target_tumour_id,
    volume_for_size,
)
from maisi.resources import __file__ as resources_init

WHERE = "$.anatomy.controllable_anatomy_size"


# ------------------------------------------------------------------------- MAISI's check_input cases


def test_the_slots_are_maisis_names_and_ids():
    label_dict = json.loads((Path(resources_init).parent / "maisi_label_dict.json").read_text())
    assert (
        SIZE_SLOTS[:2] == ("gallbladder", "liver")
        and SIZE_SLOTS[-1] == "bone lesion"
        and len(SIZE_SLOTS) == 10
    )
    assert [label_dict[name] for name in SIZE_SLOTS] == list(SLOT_IDS)


@pytest.mark.parametrize(
    "entries, fragment",
    [
        ([("hepatic tumor", 0.3), ("lung tumor", 0.5)], f"{WHERE}[1]: a second tumour 'lung tumor' (entry 0"),
        (
            [("liver", 0.5), ("bone lesion", -1), ("colon cancer primaries", 0.2)],
            f"{WHERE}[2]: a second tumour",
        ),
        ([("livr", 0.5)], f"{WHERE}[0]: unknown name 'livr'; did you mean 'liver'?"),
        ([("kidney", 0.5)], f"{WHERE}[0]: unknown name 'kidney' (the size slots: gallbladder,"),
        ([("liver", 0.5), ("liver", 0.2)], f"{WHERE}[1]: 'liver' repeats entry 0"),
        ([("liver", 1.2)], f"{WHERE}[0]: size 1.2 of 'liver' is outside [0, 1] and not -1"),
        ([("liver", -0.5)], "size -0.5 of 'liver' is outside [0, 1]"),
        ([(name, 0.5) for name in SIZE_SLOTS[:5]] * 2 + [("liver", 0.1)], f"{WHERE}: 11 entries; at most 10"),
        ([("liver",)], f"{WHERE}[0]: got ('liver',), expected a [name, size] pair"),
        ([("hepatic tumor", -1)], f"{WHERE}: every size is -1 (absent), so the request names no organ"),
        ([("liver", -1), ("colon", -1.0)], f"{WHERE}: every size is -1 (absent)"),
    ],
)
def test_bad_requests_are_named(entries, fragment):
    problems = size_request_problems(entries)
    assert any(fragment in p for p in problems), problems


def test_more_than_ten_entries_is_the_one_problem_named():
    # MAISI checks the length first; eleven entries repeat a slot, and ten repeat messages would bury it
    entries = [(name, 0.5) for name in SIZE_SLOTS] + [("liver", 0.2)]
    assert size_request_problems(entries) == [
        f"{WHERE}: 11 entries; at most 10 (one per size slot, as in MAISI)"
    ]


@pytest.mark.parametrize(
    "entries",
    [
        [("liver", -1), ("pancreas", 0.0)],
        [("liver", 0), ("gallbladder", 1), ("hepatic tumor", 0.3)],
        [(name, 0.5) for name in SIZE_SLOTS[:6]],  # the five organs and one tumour
        [],
    ],
)
def test_valid_requests_pass(entries):
    assert size_request_problems(entries) == []


# ------------------------------------------------------------------------------------ table and snap


def _table(tmp_path, rows, name="sizes.json"):
    path = tmp_path / name
    path.write_text(json.dumps([{"organ_size": row} for row in rows]))
    return path


ROWS = [
    [0.1, 0.2, 0.3, 0.4, 0.5, -1, -1, -1, -1, -1],
    [0.9, 0.8, 0.7, 0.6, 0.5, -1, -1, 0.4, -1, -1],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.1, -1, -1, -1, -1],
]


def test_snap_picks_the_nearest_row_then_overwrites_the_named_slots(tmp_path):
    table = load_size_table(_table(tmp_path, ROWS))
    assert table.shape == (3, 10)
    # liver 0.75: |0.2-0.75| = 0.55, |0.8-0.75| = 0.05, |0.5-0.75| = 0.25 -> row 1
    snap = snap_to_table([("liver", 0.75)], table)
    assert snap.row == 1 and snap.distance == pytest.approx(0.05)
    assert snap.snapped == tuple(ROWS[1]) and snap.final == (0.9, 0.75, 0.7, 0.6, 0.5, -1, -1, 0.4, -1, -1)
    # gallbladder 0.4 (0.3, 0.5, 0.1) + hepatic tumour 0.4 (1.4, 0.0, 1.4): row 1 at 0.5, row 0 at 1.7
    snap = snap_to_table([("gallbladder", 0.4), ("hepatic tumor", 0.4)], table)
    assert snap.row == 1 and snap.distance == pytest.approx(0.5) and snap.final[0] == 0.4
    # -1 is a value (absent), not "don't care": lung tumor -1 keeps away from row 2 (|-1 - 0.1| = 1.1)
    snap = snap_to_table([("liver", 0.5), ("lung tumor", -1)], table)
    assert snap.row == 0 and snap.distance == pytest.approx(0.3)
    # ties go to the first row, as MAISI's stable sort
    assert snap_to_table([("colon", 0.5)], table).row == 0


def test_target_tumour_is_the_tumour_slot_that_is_not_minus_one():
    assert target_tumour_id(ROWS[0]) is None
    assert target_tumour_id(ROWS[1]) == 26 and target_tumour_id(ROWS[2]) == 23


def test_snap_refuses_an_invalid_request(tmp_path):
    with pytest.raises(InputError, match="unknown name 'spleen'"):
        snap_to_table([("spleen", 0.5)], load_size_table(_table(tmp_path, ROWS)))


@pytest.mark.parametrize(
    "content, fragment",
    [
        ([{"organ_size": [0.1] * 9}], "row 0 ($[0].organ_size): 9 values, expected 10 (the size slots)"),
        ([{"organ_size": [0.1] * 10}, {"organ_size": [0.1] * 11}], "row 1 ($[1].organ_size): 11 values"),
        ([{"organ_size": [0.1] * 9 + ["big"]}], "row 0 ($[0].organ_size): expected a list of numbers"),
        ([{"size": [0.1] * 10}], "row 0 ($[0].organ_size): expected a list of numbers"),
        ({"organ_size": [0.1] * 10}, "a size table is a non-empty list"),
        ([], "a size table is a non-empty list"),
    ],
)
def test_bad_tables_are_named_with_file_and_row(tmp_path, content, fragment):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError) as err:
        load_size_table(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_non_finite_values_and_a_table_that_does_not_match_the_checkpoint(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('[{"organ_size": [0.1, NaN, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}]')
    with pytest.raises(InputError, match=r"\$\[0\]\.organ_size\[1\]"):
        load_size_table(path)
    with pytest.raises(
        InputError, match="expected 12 .the checkpoint's cross_attention_dim.; the table does not"
    ):
        load_size_table(_table(tmp_path, ROWS), width=12)


# -------------------------------------------------------------------------------------- size scale


def test_organ_volumes_in_ml():
    mask = np.zeros((10, 10, 10), dtype=np.int16)
    mask[:2, :2, :2] = 1  # 8 voxels of liver
    mask[5, 5, 5] = 26
    volumes = organ_volumes_ml(mask, (2.0, 2.0, 2.5))  # 10 mm^3 per voxel
    assert volumes[1] == pytest.approx(0.08) and volumes[7] == pytest.approx(0.01)
    assert np.count_nonzero(volumes) == 2


def test_percentile_rank_by_hand_and_its_inverse():
    reference = build_size_reference(np.array([[0, v] + [0] * 8 for v in (100.0, 200.0, 200.0, 400.0)]))
    assert reference["liver"].tolist() == [100, 200, 200, 400] and reference["gallbladder"].size == 0
    # mid-ranks: 100 -> 0.125, 200 (tied, ranks 1 and 2) -> 0.5, 400 -> 0.875; linear in between
    assert size_of_volume("liver", 100, reference) == pytest.approx(0.125)
    assert size_of_volume("liver", 200, reference) == pytest.approx(0.5)
    assert size_of_volume("liver", 300, reference) == pytest.approx(0.6875)
    assert size_of_volume("liver", 50, reference) == pytest.approx(0.125)  # below the smallest: its rank
    assert size_of_volume("liver", 0, reference) == -1
    for value in (0.125, 0.3, 0.5, 0.8, 0.875):
        assert size_of_volume(
            "liver", volume_for_size("liver", value, reference), reference
        ) == pytest.approx(value)
    assert volume_for_size("liver", 0.0, reference) == 100 and volume_for_size("liver", 1.0, reference) == 400
    assert volume_for_size("liver", -1, reference) == 0.0
    with pytest.raises(InputError, match="has no volumes of 'gallbladder'"):
        volume_for_size("gallbladder", 0.5, reference)


def test_size_vector_of_a_mask_orders_like_its_volume():
    reference = build_size_reference(np.array([[0, v] + [0] * 8 for v in (1.0, 2.0, 3.0, 4.0)]))
    small, large = np.zeros((20, 20, 20), np.uint8), np.zeros((20, 20, 20), np.uint8)
    small[:5, :5, :5] = 1  # 125 voxels of 1 mm^3 = 0.125 mL
    large[:15, :15, :15] = 1  # 3.375 mL
    a, b = size_vector(small, (1, 1, 1), reference), size_vector(large, (1, 1, 1), reference)
    assert a[1] < b[1] and a[1] == pytest.approx(0.125) and b[1] == pytest.approx(0.625 + 0.375 * 0.25)
    assert a[0] == -1 and a[2:] == [-1.0] * 8


def test_reference_file_round_trip_and_bad_files(tmp_path):
    reference = build_size_reference(np.array([[1.0, 2.0] + [0] * 8, [3.0, 1.5] + [0] * 8]))
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(reference_json(reference, "two masks")))
    loaded = load_size_reference(path)
    assert loaded["liver"].tolist() == [1.5, 2.0] and loaded["gallbladder"].tolist() == [1.0, 3.0]
    data = json.loads(path.read_text())
    del data["size_reference"]["colon"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"reference.json: .*missing: \['colon'\]"):
        load_size_reference(path)
    data["size_reference"]["colon"] = [-3]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"\$\.size_reference\.colon: expected a list of volumes"):
        load_size_reference(path)


# ------------------------------------------------------------------------------------------ config


def _infer_config(tmp_path, **anatomy) -> dict:
    return {
        "preset": "tiny-rflow",
        "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "d.pt", "controlnet": "c.pt"},
        "anatomy": {"anatomy_list": [], **anatomy},
        "output_size": [32, 32, 32],
        "spacing": [2.0, 2.0, 2.0],
    }


def _load(tmp_path, data):
    path = tmp_path / "infer.json"
    path.write_text(json.dumps(data))
    return load_config(path, "infer")


def test_schema_parse_round_trip_of_the_size_keys(tmp_path):
    config = _load(tmp_path, _infer_config(tmp_path))
    assert config.anatomy.controllable_anatomy_size == () and not config.anatomy.generates_mask
    generator = config.anatomy.mask_generator
    assert generator.size_conditions is None and generator.num_inference_steps is None
    assert generator.scheduler == "ddpm" and generator.steps == 1000  # MAISI's
    assert generator.preset is generator.autoencoder is generator.size_reference is None


def test_the_parsed_request(tmp_path):
    data = _infer_config(
        tmp_path,
        controllable_anatomy_size=[["liver", 1], ["hepatic tumor", 0.3], ["colon", -1]],
        mask_generator={
            "size_conditions": "tables/sizes.json",
            "scheduler": "ddim",
            "num_inference_steps": 50,
        },
    )
    anatomy = _load(tmp_path, data).anatomy
    assert anatomy.controllable_anatomy_size == (("liver", 1.0), ("hepatic tumor", 0.3), ("colon", -1.0))
    assert isinstance(anatomy.controllable_anatomy_size[0][1], float) and anatomy.generates_mask
    assert anatomy.required_anatomy == ("liver", "hepatic tumor")  # -1: asked to be absent
    assert anatomy.mask_generator.size_conditions == str((tmp_path / "tables" / "sizes.json").resolve())
    assert anatomy.mask_generator.num_inference_steps == 50 and anatomy.mask_generator.steps == 50


def test_config_names_every_problem_of_a_request(tmp_path):
    data = _infer_config(
        tmp_path,
        controllable_anatomy_size=[["livr", 0.5], ["hepatic tumor", 0.3], ["lung tumor", 2]],
        body_region=["abdomen"],
    )
    data["anatomy"]["anatomy_list"] = ["liver"]
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, data)
    text = "\n".join(err.value.errors)
    for fragment in (
        f"{WHERE}[0]: unknown name 'livr'; did you mean 'liver'?",
        f"{WHERE}[2]: a second tumour 'lung tumor'",
        f"{WHERE}[2]: size 2 of 'lung tumor' is outside [0, 1]",
        "$.anatomy.body_region: must be empty when $.anatomy.controllable_anatomy_size is set",
        "$.anatomy.anatomy_list: must be empty when",
    ):
        assert fragment in text, text


def test_an_empty_request_with_generator_settings_is_refused_not_silently_retrieved(tmp_path):
    data = _infer_config(
        tmp_path, controllable_anatomy_size=[], mask_generator={"size_conditions": "sizes.json"}
    )
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, data)
    assert err.value.errors == [
        f"{WHERE}: empty, but $.anatomy.mask_generator is set: the mask "
        "generator runs only for a size request (e.g. [['liver', 0.5]]); an empty list retrieves the mask "
        "from the database, so remove $.anatomy.mask_generator for that"
    ]
    # an empty list alone is MAISI's retrieval path, and an empty generator block is its default
    del data["anatomy"]["mask_generator"]["size_conditions"]
    assert not _load(tmp_path, data).anatomy.generates_mask


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([["liver"]], f'{WHERE}[0]: got ["liver"]'),
        ([["liver", "big"]], f'{WHERE}[0][1]: got "big", expected type number'),
        ([["liver", 0.5, 1]], f'{WHERE}[0]: got ["liver", 0.5, 1]'),
        ({"liver": 0.5}, f'{WHERE}: got {{"liver": 0.5}}, expected type array'),
    ],
)
def test_schema_refuses_malformed_pairs(tmp_path, value, fragment):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _infer_config(tmp_path, controllable_anatomy_size=value))
    assert any(fragment in e for e in err.value.errors), err.value.errors


def test_mask_generation_steps_bounds(tmp_path):
    for steps in (0, 1001):
        with pytest.raises(ConfigError, match="mask_generator.num_inference_steps"):
            _load(tmp_path, _infer_config(tmp_path, mask_generator={"num_inference_steps": steps}))


def test_the_config_layer_imports_no_numpy():
    code = "import sys, maisi.config.infer_config; print('numpy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
