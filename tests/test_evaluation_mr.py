"""``maisi.evaluate`` on MR: the 2.5D FID scales MR by its percentiles (not from HU), each synthetic file's
modality comes from its ``maisi.infer`` metadata, a CT/MR mix is refused, montage rows use the MR window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maisi import evaluate, infer
from maisi.data.io import Volume, read_volume, write_volume
from maisi.evaluation.fid import load_feature_network, modality_mix_problem, volume_features
from maisi.preview import display_windows
from tests.conftest import mr_infer_config, mr_like, write_config
from tests.test_evaluation import torchvision_layout

CPU = torch.device("cpu")
AFFINE = np.diag([1.25, 1.0, 1.0, 1.0])
FID = {"slice_step": 8, "image_size": 32}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_mr_checkpoints) -> dict[str, Path]:
    """Two generated MR samples (tiny-mr-rflow, with metadata), real MR and CT datalists, FID weights."""
    root = tmp_path_factory.mktemp("evaluation-mr")
    output = {"dir": str(root / "gen"), "preview": False}
    infer_config = mr_infer_config(root, tiny_mr_checkpoints, num_samples=2, output=output)
    assert infer.main(["--config", str(infer_config), "--no-progress"]) == 0
    out = {"gen": root / "gen", "weights": root / "resnet18_quarter.pt"}
    torch.save(torchvision_layout().state_dict(), out["weights"])
    mr_entries, ct_entries = [], []
    for i in range(2):
        write_volume(root / f"mr{i}.nii.gz", Volume(mr_like(i), AFFINE))
        mr_entries.append({"image": f"mr{i}.nii.gz", "modality": "mri_t1"})
        ct = np.clip(mr_like(10 + i) * 4 - 1000, -1024, 3000).astype(np.int16)
        write_volume(root / f"ct{i}.nii.gz", Volume(ct, AFFINE))
        ct_entries.append({"image": f"ct{i}.nii.gz"})
    out["mr_datalist"] = write_config(root / "mr.json", {"training": mr_entries})
    out["ct_datalist"] = write_config(root / "ct.json", {"training": ct_entries})
    return out


def _evaluate_config(tmp_path: Path, inputs: dict[str, Path], **changes) -> Path:
    data = {
        "real_datalist": str(inputs["mr_datalist"]),
        "synthetic": str(inputs["gen"] / "*_image.nii.gz"),
        "diversity": {"enabled": False},
        "fid": {"weights": str(inputs["weights"]), **FID},
        "output": {"report": str(tmp_path / "out" / "report.json")},
        "device": "cpu",
    }
    data.update(changes)
    return write_config(tmp_path / "evaluate.json", data)


def test_mr_fid_features_follow_the_mr_percentile_scaling_not_hu(inputs):
    net = load_feature_network(inputs["weights"], CPU)
    image = mr_like(3)

    def features(array: np.ndarray, modality: str) -> dict:
        return volume_features(net, array, 8, 32, 64, CPU, modality=modality)

    mr, scaled = features(image, "mri_t2"), features(image * 3.0 + 40.0, "mri_t2")
    for plane, f in mr.items():  # percentile scaling: a linear change of MR units changes nothing
        torch.testing.assert_close(f, scaled[plane], rtol=1e-4, atol=1e-5)
    as_hu, scaled_hu = features(image, "ct"), features(image * 3.0 + 40.0, "ct")
    assert not torch.allclose(as_hu["xy"], mr["xy"])  # the HU window saw these values otherwise
    assert not torch.allclose(as_hu["xy"], scaled_hu["xy"])


def test_synthetic_modality_comes_from_its_infer_metadata(inputs, tmp_path):
    # $.modality is left at its default (ct): the metadata beside each sample says mri_t1
    config = _evaluate_config(tmp_path, inputs, output={"report": "out/r.json", "montage": "out/m.png"})
    assert evaluate.main(["--config", str(config), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    samples = sorted(inputs["gen"].glob("*_image.nii.gz"))
    assert len(samples) == 2 and all(report["modalities"][str(p)] == "mri_t1" for p in samples)
    assert report["fid"]["intensity"] == "mr_percentile" and np.isfinite(report["fid"]["mean"])
    # montage rows in each volume's MR window, not the CT soft-tissue window
    rows = report["montage"]["rows"]
    for row in rows:
        ((name, level, width),) = display_windows(read_volume(row["image"]), "mri_t1")
        assert row["window"] == {"name": name, "level": pytest.approx(level), "width": pytest.approx(width)}
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "m.png")))
    assert (picture == 255).mean() < 0.02 and len(np.unique(picture)) > 50


@pytest.mark.parametrize("mix", ["real CT, synthetic MR by metadata", "real MR, synthetic CT by $.modality"])
def test_an_fid_mixing_ct_and_mr_exits_2_naming_the_files(inputs, tmp_path, capsys, mix):
    if mix.startswith("real CT"):
        config = _evaluate_config(tmp_path, inputs, real_datalist=str(inputs["ct_datalist"]))
        ct = [inputs["ct_datalist"].parent / f"ct{i}.nii.gz" for i in range(2)]
        mr = sorted(inputs["gen"].glob("*_image.nii.gz"))
    else:
        synthetic = [str(inputs["ct_datalist"].parent / f"ct{i}.nii.gz") for i in range(2)]  # no metadata
        config = _evaluate_config(tmp_path, inputs, synthetic=synthetic)
        ct = [Path(p) for p in synthetic]
        mr = [inputs["mr_datalist"].parent / f"mr{i}.nii.gz" for i in range(2)]
    capsys.readouterr()
    assert evaluate.main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "FID: the inputs mix CT and MR" in err and "Traceback" not in err, err
    assert f"CT: {ct[0]}, {ct[1]}; MR: {mr[0]}, {mr[1]}" in err, err
    assert not (tmp_path / "out").exists()  # nothing written
    # without the FID there is no comparison to refuse
    no_fid = _evaluate_config(
        tmp_path, inputs, real_datalist=str(inputs["ct_datalist"]), fid={"weights": None}
    )
    assert evaluate.main(["--config", str(no_fid), "--no-progress"]) == 0


def test_mix_problem_is_none_for_one_modality_family():
    assert modality_mix_problem({Path("a"): "ct", Path("b"): "ct_contrast", Path("c"): "unknown"}) is None
    assert modality_mix_problem({Path("a"): "mri", Path("b"): "mri_flair"}) is None
    assert "CT: a; MR: b" in modality_mix_problem({Path("a"): "ct", Path("b"): "mri"})


def _sample_with_metadata(folder: Path, meta: object | str) -> Path:
    image = write_volume(folder / "s_seed0_image.nii.gz", Volume(mr_like(7), AFFINE))
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (folder / "s_seed0.json").write_text(text)
    return image


GOOD = {"files": {"image": "s_seed0_image.nii.gz"}, "conditions": {"modality": "mri_flair"}}
METADATA = [
    ("unreadable", "{", 2, "s_seed0.json: unreadable metadata of"),
    (
        "unknown modality",
        {**GOOD, "conditions": {"modality": "xray"}},
        2,
        "s_seed0.json: conditions.modality",
    ),
    (
        "contradicts its intensity",
        {**GOOD, "intensity": {"kind": "ct"}},
        2,
        "conditions.modality 'mri_flair' contradicts intensity.kind 'ct'",
    ),
    ("another sample's", {**GOOD, "files": {"image": "other_image.nii.gz"}}, 0, "ct"),
    ("declares MR", GOOD, 0, "mri_flair"),
]


@pytest.mark.parametrize("meta, code, expected", [m[1:] for m in METADATA], ids=[m[0] for m in METADATA])
def test_synthetic_metadata_is_checked_before_any_work(inputs, tmp_path, capsys, meta, code, expected):
    image = _sample_with_metadata(tmp_path / "syn", meta)
    config = _evaluate_config(
        tmp_path, inputs, synthetic=[str(image)], real_datalist=None, fid={"weights": None}
    )
    capsys.readouterr()
    assert evaluate.main(["--config", str(config), "--no-progress"]) == code
    if code == 2:
        err = capsys.readouterr().err
        assert expected in err and str(tmp_path / "syn" / "s_seed0.json") in err and "Traceback" not in err, (
            err
        )
        assert not (tmp_path / "out").exists()
    else:
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["modalities"] == {str(image): expected}
