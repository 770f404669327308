"""``maisi.evaluation.run`` / ``maisi.evaluation.fid`` / ``maisi.evaluate``: metrics on real CT, the report
and montage, bad input.

Real CT: ``totalseg_example_ct_sm.nii.gz`` (122 x 101 x 30 at 3 mm). Its 30 slices are too few for MS-SSIM's
5 scales even with a 3-voxel window (48 needed): its MS-SSIM is skipped with the reason while PSNR and SSIM
are computed, and the positive MS-SSIM tests use a 64 x 64 x 48 crop of the same CT padded with air in z. The
feature network is a randomly initialised quarter-width ResNet-18 saved to a local file (128 features: the
FID's matrix square root stays fast).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import MultiScaleSSIMMetric
from monai.networks.nets.resnet import ResNet, resnet50

from maisi.checkpoints import load_network, save_checkpoint
from maisi.config import load_config
from maisi.data.io import Volume, read_volume, write_volume
from maisi.encoding.cases import transform
from maisi.errors import CheckpointError, ConfigError, InputError
from maisi.evaluate import main
from maisi.evaluation.fid import (
    PLANES,
    build_resnet,
    fid_25d,
    load_feature_network,
    preprocess,
    slice_counts,
    volume_features,
)
from maisi.evaluation.run import image_metrics, montage_row, ms_ssim_min_size, pairwise_ms_ssim, reconstruct
from maisi.families.ct import get_preset
from maisi.families.networks import build_network
from maisi.intensity import hu_to_unit
from maisi.preview import GAP
from tests.conftest import write_config

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
CT = DATA / "totalseg_example_ct_sm.nii.gz"
CHEST = DATA / "slicerio_CTChest4.nrrd"
CPU = torch.device("cpu")


def small_resnet(**kwargs) -> ResNet:
    """A quarter-width 2D ResNet-18 (MONAI classes)."""
    return ResNet(
        "basic", [2, 2, 2, 2], [64, 128, 256, 512], **{"spatial_dims": 2, "widen_factor": 0.25, **kwargs}
    )


def torchvision_layout(**kwargs) -> ResNet:
    """MONAI's ResNet built as torchvision's: stride-2 conv1, bias-free shortcut convolutions, fc head."""
    return small_resnet(conv1_t_stride=2, bias_downsample=False, num_classes=1000, **kwargs)


def unit(volume: Volume) -> torch.Tensor:
    return torch.from_numpy(hu_to_unit(volume.array))[None, None]


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(CT)


@pytest.fixture(scope="module")
def files(tmp_path_factory, ct) -> dict[str, Path]:
    """A 64 x 64 x 48 real-CT crop (and its 64 x 64 x 30 original), two noisy copies as 'synthetic' samples, a
    datalist, a VAE, feature weights."""
    root = tmp_path_factory.mktemp("evaluation")
    array = np.full((64, 64, 48), -1000, dtype=np.int16)
    array[:, :, 9:39] = ct.array[29:93, 18:82, :]
    base = Volume(array, ct.affine.copy())
    rng = np.random.default_rng(0)
    out = {"ct48": write_volume(root / "real" / "ct48.nii.gz", base)}
    crop_affine = ct.affine.copy()
    crop_affine[:3, 3] += crop_affine[:3, :3] @ [29, 18, 0]  # the crop keeps its place in the world
    out["thin"] = write_volume(root / "real" / "thin.nii.gz", Volume(ct.array[29:93, 18:82, :], crop_affine))
    for i, sigma in enumerate((30.0, 100.0)):
        noisy = (array + rng.normal(0.0, sigma, array.shape)).round().astype(np.int16)
        out[f"syn{i}"] = write_volume(root / "synthetic" / f"sample{i}_image.nii.gz", base.with_array(noisy))
    out["datalist"] = write_config(root / "real.json", {"training": [{"image": "real/ct48.nii.gz"}]})
    out["small_datalist"] = write_config(root / "small.json", {"training": [{"image": str(CT)}]})
    torch.manual_seed(0)
    out["weights"] = root / "resnet18_quarter.pt"
    torch.save(torchvision_layout().state_dict(), out["weights"])
    out["weights_1ch"] = root / "resnet18_quarter_1ch.pt"
    torch.save(torchvision_layout(n_input_channels=1).state_dict(), out["weights_1ch"])
    preset = get_preset("tiny-rflow")
    out["vae"] = save_checkpoint(root / "vae.pt", build_network(preset, "autoencoder"), preset, "autoencoder")
    return out


# ------------------------------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(ct, files):
    net = load_feature_network(files["weights"], CPU)
    rng = np.random.default_rng(1)

    def features(sigma: float) -> dict:
        hu = ct.array + rng.normal(0.0, sigma, ct.shape) if sigma else ct.array
        feats = volume_features(net, hu, step=4, image_size=32, batch_size=64, device=CPU, modality="ct")
        assert (
            {p: f.shape[0] for p, f in feats.items()}
            == slice_counts(ct.shape, 4)
            == {"xy": 8, "yz": 31, "zx": 26}
        )
        return {p: [f] for p, f in feats.items()}

    real = features(0.0)
    same, low, high = fid_25d(real, real), fid_25d(real, features(50.0)), fid_25d(real, features(200.0))
    assert set(same) == {"xy", "yz", "zx", "mean"}
    assert abs(same["mean"]) < 1e-4 and all(abs(same[p]) < 1e-4 for p in PLANES)
    assert low["mean"] > 100 * abs(same["mean"]) + 1e-3
    assert all(low[p] < high[p] for p in PLANES) and low["mean"] < high["mean"]
    assert high["mean"] == pytest.approx(np.mean([high[p] for p in PLANES]))


def test_preprocessing_resizes_repeats_channels_and_normalises_like_imagenet():
    x = preprocess(torch.full((5, 40, 24), 0.5), image_size=32)
    assert x.shape == (5, 3, 32, 32)
    expected = [(0.5 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert torch.allclose(x[:, :, 7, 9], torch.tensor(expected).expand(5, 3), atol=1e-5)


@pytest.mark.parametrize("layout", ["torchvision", "monai", "wrapped-ddp"])
def test_accepted_weight_layouts(tmp_path, layout):
    torch.manual_seed(2)
    if layout == "monai":  # MONAI's own 2D ResNet: shortcut convolutions with bias, no fc
        net = small_resnet(conv1_t_stride=2, feed_forward=False)
        obj = net.state_dict()
    else:
        net = torchvision_layout()
        obj = net.state_dict()
        if layout == "wrapped-ddp":
            obj = {"state_dict": {f"module.{k}": v for k, v in obj.items()}}
    torch.save(obj, tmp_path / "w.pt")
    loaded = load_feature_network(tmp_path / "w.pt", CPU)
    assert loaded.name == "resnet18 x0.25 width" and loaded.features == 128
    net.fc = None  # features are taken before the classifier
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.network(x), net.eval()(x), atol=1e-5)


def test_torchvision_resnet50_keys_are_monai_keys():
    # torchvision's resnet50().state_dict() has 320 entries named conv1, bn1, layer1.0.conv1 ... fc; MONAI's
    # ResNet with bias-free shortcuts and an fc head has exactly those names and shapes: no renaming needed.
    sd = ResNet(
        "bottleneck",
        [3, 4, 6, 3],
        [64, 128, 256, 512],
        spatial_dims=2,
        conv1_t_stride=2,
        bias_downsample=False,
        num_classes=1000,
    ).state_dict()
    assert len(sd) == 320 and tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    assert {"layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "bn1.num_batches_tracked"} <= set(sd)
    assert build_resnet(sd, Path("tv.pt"))[1] == "resnet50"
    assert (
        build_resnet(resnet50(spatial_dims=2, n_input_channels=3).state_dict(), Path("monai.pt"))[1]
        == "resnet50"
    )


def test_wrong_weights_raise_checkpoint_error_naming_the_conflicts(tmp_path, files):
    with pytest.raises(
        CheckpointError, match=r"conv1\.weight: file \(16, 1, 7, 7\) vs network \(16, 3, 7, 7\)"
    ):
        load_feature_network(files["weights_1ch"], CPU)
    sd = torchvision_layout().state_dict()
    sd["layer3.0.conv1.weight"] = torch.zeros(64, 16, 3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    conflict = (
        r"1 shape conflicts: layer3\.0\.conv1\.weight: file \(64, 16, 3, 3\) vs network \(64, 32, 3, 3\)"
    )
    with pytest.raises(CheckpointError, match=conflict):
        load_feature_network(tmp_path / "bad.pt", CPU)
    cases = {
        "3d": (small_resnet(spatial_dims=3).state_dict(), "a 3D network; the 2.5D FID needs a 2D ResNet"),
        "keras": ({**torchvision_layout().state_dict(), "conv1.bias": torch.zeros(16)}, "RadImageNet"),
        "other": ({"weight": torch.zeros(3)}, "not the weights of a ResNet"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message):
            load_feature_network(tmp_path / f"{name}.pt", CPU)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        load_feature_network(tmp_path / "garbage.pt", CPU)


# -------------------------------------------------------------------------------- MS-SSIM and friends


def test_ms_ssim_size_rule_matches_monai_and_too_small_volumes_say_what_is_needed(ct):
    assert ms_ssim_min_size(11) == 176 and ms_ssim_min_size(3) == 48 and ms_ssim_min_size(3, scales=3) == 12
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=3)
    assert metric(torch.rand(1, 1, 48, 48), torch.rand(1, 1, 48, 48)).shape == (1, 1)
    with pytest.raises(ValueError):  # MONAI itself refuses one voxel less
        metric(torch.rand(1, 1, 47, 48), torch.rand(1, 1, 47, 48))
    u = unit(ct)
    thin = image_metrics(u, u, kernel_size=3)  # 30 slices: PSNR and SSIM, not MS-SSIM
    assert thin["psnr"] == math.inf and thin["ssim"] == pytest.approx(1.0) and thin["ms_ssim"] is None
    assert thin["skipped"] == {
        "ms_ssim": "volume [122, 101, 30] is too small for MS-SSIM's 5 scales with "
        "kernel_size 3: every axis needs at least 48 voxels"
    }
    assert image_metrics(u, u)["skipped"]["ms_ssim"].endswith("at least 176 voxels")
    flat = image_metrics(u[..., :2], u[..., :2], kernel_size=3)  # thinner than the SSIM window itself
    assert flat["ssim"] is None and flat["ms_ssim"] is None and flat["psnr"] == math.inf
    assert flat["skipped"]["ssim"] == (
        "volume [122, 101, 2] is thinner than the SSIM window: every axis needs at least kernel_size 3 voxels"
    )


def test_reconstruction_metrics_are_finite_and_a_perfect_reconstruction_is_inf(files):
    vae, _ = load_network(get_preset("tiny-rflow"), "autoencoder", files["vae"])
    u = unit(read_volume(files["ct48"]))
    recon = reconstruct(vae, u, 4, 16)  # a 16 MiB budget: many tiles
    assert recon.shape == u.shape and recon.min() >= 0 and recon.max() <= 1
    metrics = image_metrics(recon, u, kernel_size=3)
    assert metrics.pop("skipped") == {}
    assert set(metrics) == {"psnr", "ssim", "ms_ssim"} and all(math.isfinite(v) for v in metrics.values())
    assert metrics["psnr"] < 40 and metrics["ssim"] < 0.99  # a random VAE does not reconstruct
    perfect = image_metrics(u, u, kernel_size=3)
    assert perfect["psnr"] == math.inf
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["ms_ssim"] == pytest.approx(1.0)
    # two sliding windows along y, and a size that is no multiple of the VAE factor (padded, cropped back)
    crop = u[..., :62, :61, :]
    assert reconstruct(vae, crop, 4, 1024).shape == crop.shape


def test_diversity_is_one_for_identical_volumes_lower_for_different_and_needs_two(files):
    a, b = unit(read_volume(files["ct48"])), unit(read_volume(files["syn1"]))
    same = pairwise_ms_ssim([a, a, a], 3, 1.5, CPU)
    assert same["count"] == 3 and same["pairs"] == 3 and same["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-5)
    assert pairwise_ms_ssim([a, b], 3, 1.5, CPU)["ms_ssim_mean"] < 0.99
    with pytest.raises(InputError, match="diversity needs at least 2 volumes, got 1"):
        pairwise_ms_ssim([a], 3, 1.5, CPU)


# ------------------------------------------------------------------------------------------------ CLI


def evaluate_config(tmp_path: Path, files: dict[str, Path], **changes) -> Path:
    data = {
        "real_datalist": str(files["datalist"]),
        "synthetic": str(files["syn0"].parent / "*_image.nii.gz"),
        "reconstruction": {
            "enabled": True,
            "preset": "tiny-rflow",
            "autoencoder": str(files["vae"]),
            "memory_budget_mb": 16,
        },
        "ssim": {"kernel_size": 3},
        "fid": {"weights": str(files["weights"]), "slice_step": 8, "image_size": 32},
        "output": {"report": "out/report.json", "montage": "out/montage.png"},
        "device": "cpu",
    }
    data.update(changes)
    return write_config(tmp_path / "evaluate.json", data)


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_cli_writes_the_report_and_the_montage(tmp_path, files):
    assert main(["--config", str(evaluate_config(tmp_path, files)), "--no-progress"]) == 0
    report = _strict_json(tmp_path / "out" / "report.json")
    assert {"inputs", "reconstruction", "diversity", "fid", "fid_skipped", "montage", "config"} <= set(report)
    assert report["inputs"] == {
        "real": [str(files["ct48"])],
        "synthetic": [str(files["syn0"]), str(files["syn1"])],
    }
    case = report["reconstruction"]["cases"][0]
    assert case["image"] == str(files["ct48"]) and case["shape"] == case["evaluated_shape"] == [64, 64, 48]
    assert case["evaluated_spacing"] == [3.0, 3.0, 3.0] and case["skipped"] == {}
    assert all(math.isfinite(report["reconstruction"]["mean"][m]) for m in ("psnr", "ssim", "ms_ssim"))
    assert report["reconstruction"]["count"] == {"psnr": 1, "ssim": 1, "ms_ssim": 1}
    assert report["reconstruction"]["skipped"] == {} and report["reconstruction"]["target_spacing"] is None
    synthetic = report["diversity"]["synthetic"]
    assert synthetic["count"] == 2 and synthetic["pairs"] == 1 and 0 < synthetic["ms_ssim_mean"] < 1
    assert "at least 2 volumes, got 1" in report["diversity"]["real"]["skipped"]
    fid = report["fid"]
    assert report["fid_skipped"] is None and all(fid[p] > 0 for p in ("xy", "yz", "zx", "mean"))
    assert fid["network"] == "resnet18 x0.25 width" and fid["features"] == 128
    assert fid["slices"] == {"real": {"xy": 6, "yz": 8, "zx": 8}, "synthetic": {"xy": 12, "yz": 16, "zx": 16}}
    # montage: rows real, synthetic, synthetic; each row axial 64 x 64, coronal and sagittal 48 x 64
    # (3 mm iso), 64 x 200 pixels with the gaps, scaled 4x to the row height of 256
    assert [r["set"] for r in report["montage"]["rows"]] == ["real", "synthetic", "synthetic"]
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "montage.png")))
    assert picture.dtype == np.uint8 and picture.shape == (3 * 256 + 2 * GAP, 4 * (3 * 64 + 2 * GAP))
    row = montage_row(read_volume(files["ct48"]), height=None)
    assert row.shape == (64, 3 * 64 + 2 * GAP)
    assert np.array_equal(picture[:256], np.repeat(np.repeat(row, 4, axis=0), 4, axis=1))
    assert np.array_equal(picture[2 * (256 + GAP) :], montage_row(read_volume(files["syn1"])))
    assert (picture[256 : 256 + GAP] == 128).any() and not (
        picture[2 * 256 + GAP : 2 * 256 + 2 * GAP] == 128
    ).any()


def test_cli_without_weights_skips_the_fid_and_says_why(tmp_path, files, caplog, monkeypatch):
    # real CT only, on two grids: no FID, and the real diversity (a reference) is skipped with its reason
    two = write_config(
        tmp_path / "two.json", {"training": [{"image": str(files["ct48"])}, {"image": str(CHEST)}]}
    )
    config = evaluate_config(
        tmp_path,
        files,
        real_datalist=str(two),
        synthetic=None,
        reconstruction={"enabled": False},
        fid={"weights": None},
        output={"report": "r.json"},
    )
    assert main(["--config", str(config), "--no-progress"]) == 0
    report = _strict_json(tmp_path / "r.json")
    assert (
        report["fid"] is None
        and "no feature-network weights given ($.fid.weights is null)" in report["fid_skipped"]
    )
    assert report["reconstruction"] is None and report["montage"] is None
    assert list(report["diversity"]) == ["real"] and "one shape" in report["diversity"]["real"]["skipped"]
    assert "FID skipped: no feature-network weights given" in caplog.text


BAD_INPUT = [
    (
        "missing file",
        {"synthetic": ["{syn0}", "nowhere/missing.nii.gz"]},
        ["input file(s) not found", "missing.nii.gz"],
    ),
    ("glob matches nothing", {"synthetic": "nothing/*.nii.gz"}, ["$.synthetic: no file matches"]),
    (
        "mismatched grids",
        {"synthetic": ["{syn0}", str(CHEST)]},
        [
            "synthetic set: diversity needs volumes of one shape",
            "[64, 64, 48]: ",
            "sample0_image.nii.gz",
            "[128, 128, 34]: ",
            "slicerio_CTChest4.nrrd",
        ],
    ),
    ("one sample", {"synthetic": ["{syn0}"]}, ["synthetic set: diversity needs at least 2 volumes, got 1"]),
    (
        "synthetic too small for MS-SSIM",
        {"synthetic": [str(CT), str(CT)], "fid": {"weights": None}},
        [
            "synthetic set: volumes too small for MS-SSIM's 5 scales",
            "needs at least 48 voxels",
            "[122, 101, 30]",
        ],
    ),
    (
        "wrong feature weights",
        {"fid": {"weights": "{weights_1ch}", "slice_step": 8, "image_size": 32}},
        ["weights do not fit the resnet18 x0.25 width feature network", "conv1.weight: file (16, 1, 7, 7)"],
    ),
    (
        "too few FID slices",
        {"fid": {"weights": "{weights}", "slice_step": 64}},
        ["FID: the real set gives fewer than 2 slices in plane(s) xy: 1, yz: 1, zx: 1"],
    ),
    (
        "config check",
        {"reconstruction": {"enabled": True}, "synthetic": None},
        [
            "$.reconstruction.autoencoder: required when $.reconstruction.enabled is true",
            "$.fid.weights: the FID compares two sets",
        ],
    ),
]


@pytest.mark.parametrize(
    "changes, expected", [(c, e) for _, c, e in BAD_INPUT], ids=[n for n, _, _ in BAD_INPUT]
)
def test_bad_input_exits_2_with_a_message(tmp_path, files, capsys, changes, expected):
    def fill(value):
        if isinstance(value, str):
            return value.format(**{k: str(v) for k, v in files.items()}) if value.startswith("{") else value
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    assert main(["--config", str(evaluate_config(tmp_path, files, **fill(changes))), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_volume_too_thin_for_ms_ssim_skips_only_that_metric(tmp_path, files, caplog):
    """A 30-slice CT beside a 48-slice one: PSNR and SSIM for both, MS-SSIM for one (the run used to stop)."""
    both = {"training": [{"image": str(files["ct48"])}, {"image": str(files["thin"])}]}
    both = write_config(tmp_path / "both.json", both)
    reconstruction = {"enabled": True, "preset": "tiny-rflow", "autoencoder": str(files["vae"])}
    config = evaluate_config(
        tmp_path,
        files,
        real_datalist=str(both),
        synthetic=None,
        fid={"weights": None},
        diversity={"enabled": False},
        output={"report": "r.json"},
        reconstruction=reconstruction,
    )
    assert main(["--config", str(config), "--no-progress"]) == 0
    rec = _strict_json(tmp_path / "r.json")["reconstruction"]
    full, thin = rec["cases"]
    assert thin["image"] == str(files["thin"]) and thin["ms_ssim"] is None
    assert thin["skipped"] == {
        "ms_ssim": "volume [64, 64, 30] is too small for MS-SSIM's 5 scales with "
        "kernel_size 3: every axis needs at least 48 voxels"
    }
    assert all(math.isfinite(c[m]) for c in (full, thin) for m in ("psnr", "ssim")) and full["skipped"] == {}
    assert rec["count"] == {"psnr": 2, "ssim": 2, "ms_ssim": 1}
    assert rec["mean"]["ms_ssim"] == full["ms_ssim"]
    assert rec["mean"]["psnr"] == pytest.approx((full["psnr"] + thin["psnr"]) / 2)
    why = "not computed for 1 of 2 case(s), too small for it (each case says why)"
    assert rec["skipped"] == {"ms_ssim": why}
    assert f"ms_ssim of {files['thin']} skipped" in caplog.text


def test_target_spacing_resamples_the_real_ct_as_encode_does(tmp_path, files):
    """The 3 mm CT at 6 x 6 x 4.5 mm: the case is scored on the grid maisi.encoding.cases.transform makes."""
    datalist = write_config(tmp_path / "thin.json", {"training": [{"image": str(files["thin"])}]})
    reconstruction = {
        "enabled": True,
        "preset": "tiny-rflow",
        "autoencoder": str(files["vae"]),
        "target_spacing": [6.0, 6.0, 4.5],
    }
    config = evaluate_config(
        tmp_path,
        files,
        real_datalist=str(datalist),
        synthetic=None,
        fid={"weights": None},
        diversity={"enabled": False},
        output={"report": "r.json"},
        reconstruction=reconstruction,
    )
    assert main(["--config", str(config), "--no-progress"]) == 0
    rec = _strict_json(tmp_path / "r.json")["reconstruction"]
    case = rec["cases"][0]
    thin = read_volume(files["thin"])
    expected = transform(thin.with_array(hu_to_unit(thin.array)), [6.0, 6.0, 4.5], 1, "bilinear")
    assert rec["target_spacing"] == [6.0, 6.0, 4.5] and case["evaluated_spacing"] == [6.0, 6.0, 4.5]
    assert case["shape"] == [64, 64, 30] and case["evaluated_shape"] == list(expected.shape[1:])
    assert case["evaluated_shape"] in ([32, 32, 20], [33, 33, 21])  # half the voxels in x/y, 2/3 in z
    vae, _ = load_network(get_preset("tiny-rflow"), "autoencoder", files["vae"])
    image = expected.as_tensor()[None].float()
    by_hand = image_metrics(reconstruct(vae, image, 4, 1024), image, kernel_size=3)
    assert case["psnr"] == pytest.approx(by_hand["psnr"], rel=1e-5)
    assert case["ssim"] == pytest.approx(by_hand["ssim"], rel=1e-5)


def test_target_spacing_is_checked_by_the_schema(tmp_path, files):
    config = evaluate_config(
        tmp_path,
        files,
        reconstruction={
            "enabled": True,
            "preset": "tiny-rflow",
            "autoencoder": str(files["vae"]),
            "target_spacing": [1.0, 0.0],
        },
    )
    with pytest.raises(ConfigError) as info:
        load_config(config, "evaluate")
    assert [e.split(":")[0] for e in info.value.errors] == [
        "$.reconstruction.target_spacing",
        "$.reconstruction.target_spacing[1]",
    ]


OUTPUTS = [
    ("report is a folder", {"report": "out"}, ["$.output.report ", "out is a folder"]),
    ("report under a file", {"report": "blocker/r.json"}, ["$.output.report: ", "blocker, which is a file"]),
    (
        "montage under a file",
        {"report": "out/r.json", "montage": "blocker/sub/m.png"},
        ["$.output.montage: ", "blocker, which is a file"],
    ),
    (
        "montage is the report",
        {"report": "out/r.json", "montage": "out/r.json"},
        ["$.output.montage ", "and $.output.report ", "are one file"],
    ),
    ("report is the VAE", {"report": "{vae}"}, ["vae.pt would overwrite $.reconstruction.autoencoder "]),
]


@pytest.mark.parametrize("output, expected", [(o, e) for _, o, e in OUTPUTS], ids=[n for n, _, _ in OUTPUTS])
def test_output_locations_are_checked_before_any_work(tmp_path, files, capsys, monkeypatch, output, expected):
    """They used to be found only when the report was written, after all the metrics."""
    import maisi.evaluation.run

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(maisi.evaluation.run, "load_network", no_work)
    monkeypatch.setattr(maisi.evaluation.run, "read_volume", no_work)
    (tmp_path / "out").mkdir()
    (tmp_path / "blocker").write_text("a file")
    vae_bytes = files["vae"].read_bytes()
    output = {k: v.format(vae=files["vae"]) for k, v in output.items()}
    config = evaluate_config(tmp_path, files, output=output)
    assert main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("cannot write the outputs" in err or "refusing to evaluate" in err)
    for text in expected:
        assert text in err
    assert list((tmp_path / "out").iterdir()) == [] and (tmp_path / "blocker").read_text() == "a file"
    assert files["vae"].read_bytes() == vae_bytes


BAD_TEXT = [
    (
        b'{"output": {"report": "r.json"}, "synthetic": ["a.nii.gz"], "ssim": {"kernel_sigma": NaN}}',
        "$.ssim.kernel_sigma: got NaN, expected a finite number",
    ),
    ('{"output": {"report": "r\u00e9.json"}, "synthetic": ["a.nii.gz"]}'.encode("utf-16"), "not UTF-8 text"),
]


@pytest.mark.parametrize("raw, expected", BAD_TEXT, ids=["NaN", "UTF-16"])
def test_bad_config_text_exits_2_naming_the_file(tmp_path, capsys, raw, expected):
    path = tmp_path / "evaluate.json"
    path.write_bytes(raw)
    assert main(["--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate.json"]


def test_malformed_vae_checkpoint_exits_2_naming_the_field(tmp_path, files, capsys):
    obj = torch.load(files["vae"], weights_only=True)
    obj["architecture"] = ["not", "a", "dict"]
    torch.save(obj, tmp_path / "vae.pt")
    config = evaluate_config(
        tmp_path,
        files,
        reconstruction={"enabled": True, "preset": "tiny-rflow", "autoencoder": str(tmp_path / "vae.pt")},
    )
    assert main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    malformed = "malformed maisi-checkpoint checkpoint: field 'architecture' has type list"
    assert f"{tmp_path / 'vae.pt'}: {malformed}" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_relative_synthetic_files_resolve_against_the_config_folder(tmp_path, files, capsys):
    folder = files["syn0"].parent.parent / "cfg"
    relative = ["../synthetic/sample0_image.nii.gz", "../synthetic/sample1_image.nii.gz"]
    config = evaluate_config(folder, files, synthetic=relative)
    assert main(["--config", str(config), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["synthetic"] == [str(files["syn0"]), str(files["syn1"])]


# --------------------------------------------------------------------------------------------- config


def test_example_config_validates():
    config = load_config(REPO / "configs" / "evaluate_example.json", "evaluate")
    assert config.fid.weights is None and config.synthetic == str(REPO / "output" / "*_image.nii.gz")


def test_config_checks(tmp_path):
    reconstruction = {"enabled": True, "preset": "tiny-rflow"}
    path = write_config(
        tmp_path / "c.json", {"output": {"report": "r.json"}, "reconstruction": reconstruction}
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, "evaluate")
    assert info.value.errors == [
        "$: nothing to evaluate: set $.real_datalist and/or $.synthetic",
        "$.real_datalist: required when $.reconstruction.enabled is true",
        "$.reconstruction.autoencoder: required when $.reconstruction.enabled is true",
    ]
