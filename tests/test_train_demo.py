"""tools/train_demo.py: its defaults are the recipe the shipped demo weights record, and its options parse."""

import json
from pathlib import Path

import pytest

from maisi.data.io import read_mask, read_volume, write_volume
from tools.train_demo import TRAIN_CASES, build_parser, main, recipe_steps

REPO = Path(__file__).resolve().parents[1]


def test_the_defaults_are_the_recipe_of_the_shipped_weights():
    manifest = json.loads((REPO / "models" / "demo" / "manifest.json").read_text())
    args = build_parser().parse_args([])
    assert recipe_steps(args) == manifest["steps"]
    assert [args.ae_batch, args.ae_patch] == [manifest["autoencoder_batch"], manifest["autoencoder_patch"]]


def test_emphasis_rounds_are_steps_and_weight_pairs():
    args = build_parser().parse_args(["--controlnet-emphasis", "200:3", "100:7.5"])
    assert recipe_steps(args)["controlnet_emphasis"] == [
        {"steps": 200, "weighted_loss": 3.0},
        {"steps": 100, "weighted_loss": 7.5},
    ]
    assert build_parser().parse_args(["--controlnet-emphasis"]).controlnet_emphasis == []  # no emphasis round


@pytest.mark.parametrize("bad", ["400", "400:", "x:5", "0:5", "400:0.5"])
def test_a_malformed_emphasis_round_exits_2_naming_it(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--controlnet-emphasis", bad])
    assert stop.value.code == 2
    assert repr(bad) in capsys.readouterr().err


def test_autoencoder_only_trains_the_vae_with_fine_copies_and_leaves_the_weights_alone(
    real_cases, tmp_path, capsys
):
    cases = tmp_path / "cases"  # the three training cases, all cut from the real TotalSegmentator example
    ct, label = (
        read_volume(real_cases / "case0" / "imaging.nii.gz"),
        read_mask(real_cases / "case0" / "segmentation.nii.gz"),
    )
    for name in TRAIN_CASES:
        write_volume(cases / name / "ct.nii.gz", ct)
        write_volume(cases / name / "label.nii.gz", label)
    work, dest = tmp_path / "work", tmp_path / "dest"
    args = [
        "--cases",
        str(cases),
        "--work",
        str(work),
        "--dest",
        str(dest),
        "--device",
        "cpu",
        "--ae-steps",
        "2",
        "--ae-patch",
        "16",
        "16",
        "16",
        "--autoencoder-only",
        "--ae-fine-copies",
    ]
    assert main(args) == 0
    assert (work / "autoencoder" / "autoencoder.pt").is_file() and (
        work / "autoencoder" / "state" / "last.pt"
    ).is_file()
    assert not dest.exists() and not (work / "latents").exists()  # stopped before encoding; no weights copied
    steps = [s["step"] for s in json.loads((work / "recipe_log.json").read_text())["steps"]]
    assert steps == ["datalist", "datalist (autoencoder)", "autoencoder"]
    assert "run again without --autoencoder-only" in capsys.readouterr().out
    # the fine copies feed the VAE only: 9 coarse + 2 fine copies there, the 9 coarse ones in the shared
    # datalist
    vae_list = json.loads((work / "datalist_autoencoder.json").read_text())["training"]
    assert (
        len(json.loads((work / "prepared" / "datalist.json").read_text())["training"]) == 9
        and len(vae_list) == 11
    )
    fine = sorted(e["spacing"] for e in vae_list if e["image"].startswith("prepared_fine/"))
    assert fine == [[0.7, 0.7, 2.5], [0.7, 0.7, 5.0]]
    config = json.loads((work / "autoencoder" / "train_config.json").read_text())["config"]
    assert config["datalist"] == str(work / "datalist_autoencoder.json")


# ----------------------------------------------------------------------- tools/train_demo_masks.py


def test_every_demo_file_of_the_manifest_is_there_with_its_sha256():
    from maisi.files import file_sha256

    demo = REPO / "models" / "demo"
    manifest = json.loads((demo / "manifest.json").read_text())
    # the mask generator's files (tools/train_demo_masks.py) join them under mask_generator once shipped
    files = [*manifest["files"].values(), *manifest.get("mask_generator", {}).get("files", {}).values()]
    assert len(files) >= 3
    for entry in files:
        assert file_sha256(demo / entry["file"]) == entry["sha256"], entry["file"]


def test_a_zoom_copy_scales_the_organs_about_the_centre_and_the_ct_shares_its_grid():
    import numpy as np

    from maisi.data.io import Volume
    from tools.train_demo_masks import zoom_ct, zoom_mask

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-150.0, -120.0, 10.0]
    mask = np.zeros((100, 100, 100), dtype=np.int16)
    mask[10:90, 10:90, 10:90] = 200
    mask[35:65, 35:65, 35:65] = 1  # a 90 mm cube of liver in the middle
    size = (64, 64, 64)
    centre = affine[:3, :3] @ np.full(3, 49.5) + affine[:3, 3]
    for scale in (0.8, 1.2):
        out = zoom_mask(Volume(mask, affine), 6.0, size, scale)
        assert out.shape == size and np.allclose(out.spacing, 6.0)
        liver_ml = np.count_nonzero(out.array == 1) * 6.0**3 / 1000
        assert liver_ml == pytest.approx(90.0**3 / 1000 * scale**3, rel=0.15)
        lo, hi = np.argwhere(out.array == 1).min(0), np.argwhere(out.array == 1).max(0)
        middle = out.affine[:3, :3] @ ((lo + hi) / 2) + out.affine[:3, 3]
        assert np.allclose(middle, centre, atol=6.0)  # the liver stays where it was (within a voxel)
        ct = zoom_ct(Volume(np.where(mask > 0, 40, -1000).astype(np.int16), affine), 6.0, size, scale)
        assert ct.shape == size and np.allclose(ct.affine, out.affine)
        assert ct.array[out.array == 0].max() <= -990 and ct.array[out.array == 1].min() >= 30


def test_prepared_masks_are_on_the_generator_grid_with_cysts_given_to_their_kidney(real_cases, tmp_path):
    import numpy as np

    from maisi.data.io import read_mask, read_volume, write_volume
    from tools.train_demo_masks import MASK_CASES, prepare_masks, size_table

    ct = read_volume(real_cases / "case0" / "imaging.nii.gz")
    label = read_mask(real_cases / "case0" / "segmentation.nii.gz")
    cyst = label.array.copy()
    cyst[label.array == 14] = 116  # the whole left kidney a 'left kidney cyst', as in the chest case
    for name in MASK_CASES:
        write_volume(tmp_path / "cases" / name / "ct.nii.gz", ct)
        write_volume(tmp_path / "cases" / name / "label.nii.gz", label.with_array(cyst))
    scales = prepare_masks(tmp_path / "cases", tmp_path / "work", copies=2, seed=0)
    assert [len(s) for s in scales.values()] == [3, 3] and all(s[0] == 1.0 for s in scales.values())
    assert all(0.8 <= s <= 1.2 for case in scales.values() for s in case)
    folders = sorted((tmp_path / "work" / "masks").iterdir())
    assert len(folders) == 6
    liver = []
    for folder in folders:
        mask = read_mask(folder / "label.nii.gz")
        assert mask.shape == (64, 64, 64) and np.allclose(mask.spacing, 6.0)
        assert 116 not in mask.array and 14 in mask.array
        assert read_volume(folder / "ct.nii.gz").shape == (64, 64, 64)
        liver.append(np.count_nonzero(mask.array == 1))
    assert len(set(liver)) > 1  # the zooms give livers of different sizes
    sized = tmp_path / "sized.json"
    sized.write_text(json.dumps({"training": [{"image": "x", "anatomy_size": [0.5] * 10}]}))
    assert size_table(sized) == [{"organ_size": [0.5] * 10}]
