"""``maisi.evaluate`` with ``$.ldm``: tiny real-valued PNG / NIfTI sets written in tmp_path."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import DenseNet121, ResNet

from maisi.data.io import Volume, centred_affine, write_volume
from maisi.evaluate import main
from maisi.evaluation.fid2d import load_xrv_densenet
from maisi.families.ldm import build_ldm_network, get_ldm_preset

SIZE = 64  # MS-SSIM, 5 scales, kernel 3: every axis >= 48


def smooth(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A random smooth image in 0..255 (a few Gaussian blobs)."""
    yy, xx = np.mgrid[:size, :size] / size
    img = np.zeros((size, size))
    for _ in range(4):
        cy, cx, s = rng.uniform(0.1, 0.9, 2).tolist() + [rng.uniform(0.08, 0.25)]
        img += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return (255 * img / img.max()).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))
    return path


def write_set(folder: Path, arrays: list[np.ndarray]) -> Path:
    for i, a in enumerate(arrays):
        write_png(folder / f"{i:03d}.png", a)
    return folder


def run_config(tmp_path: Path, ldm: dict, **output) -> tuple[int, dict | None]:
    data = {
        "ldm": ldm,
        "output": {"report": str(tmp_path / "out" / "report.json"), **output},
        "device": "cpu",
    }
    cfg = tmp_path / "evaluate.json"
    cfg.write_text(json.dumps(data))
    rc = main(["--config", str(cfg), "--no-progress"])
    report = tmp_path / "out" / "report.json"
    return rc, json.loads(report.read_text()) if report.exists() else None


RANGE = {"mode": "range", "low": 0, "high": 255}
SSIM = {"kernel_size": 3, "scales": 5}


def test_identical_sets_perfect_reconstruction_metrics_and_memorised(tmp_path):
    from maisi.config.evaluate_config import LdmSsimConfig
    from maisi.evaluation.ldm_metrics import image_metrics

    rng = np.random.default_rng(0)
    image = torch.from_numpy(smooth(rng) / 255.0).float()[None, None]
    metrics = image_metrics(image, image.clone(), LdmSsimConfig(3, 1.5, 5))
    assert math.isinf(metrics["psnr"]) and metrics["skipped"] == {}
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ms_ssim"] == pytest.approx(1.0, abs=1e-5)

    images = write_set(tmp_path / "train", [smooth(rng) for _ in range(4)])
    ldm = {
        "spatial_dims": 2,
        "real": str(images),
        "synthetic": str(images),
        "training": str(images),
        "intensity": RANGE,
        "ssim": SSIM,
    }
    rc, report = run_config(tmp_path, ldm, table=str(tmp_path / "out" / "table.txt"))
    assert rc == 0
    mem = report["memorisation"]
    assert [s["distance"] for s in mem["samples"]] == [0.0] * 4
    assert mem["flagged"] == 4 and all(s["flagged"] for s in mem["samples"])
    assert [Path(s["nearest"]).name for s in mem["samples"]] == [
        Path(s["sample"]).name for s in mem["samples"]
    ]
    assert report["diversity"]["synthetic"]["ms_ssim_mean"] == pytest.approx(
        report["diversity"]["real"]["ms_ssim_mean"]
    )
    assert "4 of 4 samples flagged" in (tmp_path / "out" / "table.txt").read_text()
    assert report["intensity"].startswith("(x - 0) / (255 - 0)")


def test_noise_is_diverse_and_copies_are_not(tmp_path):
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint8) for _ in range(5)]
    one = smooth(rng)
    ldm = {
        "spatial_dims": 2,
        "synthetic": str(write_set(tmp_path / "noise", noise)),
        "real": str(write_set(tmp_path / "same", [one] * 3)),
        "intensity": RANGE,
        "ssim": SSIM,
    }
    rc, report = run_config(tmp_path, ldm)
    assert rc == 0
    assert report["diversity"]["synthetic"]["pairs"] == 10
    assert report["diversity"]["synthetic"]["ms_ssim_mean"] < 0.2
    assert report["diversity"]["real"]["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-4)
    assert report["memorisation"] is None and "training" in report["memorisation_skipped"]


def test_a_copied_training_image_is_flagged_an_independent_one_is_not(tmp_path):
    rng = np.random.default_rng(2)
    train = [smooth(rng) for _ in range(6)]
    samples = [train[2], smooth(rng)]
    for distance in ("l2", "ssim"):
        ldm = {
            "spatial_dims": 2,
            "synthetic": str(write_set(tmp_path / "samples", samples)),
            "training": str(write_set(tmp_path / "train", train)),
            "intensity": RANGE,
            "ssim": SSIM,
            "memorisation": {"distance": distance},
        }
        rc, report = run_config(tmp_path, ldm)
        assert rc == 0
        rows = report["memorisation"]["samples"]
        assert [r["flagged"] for r in rows] == [True, False]
        assert Path(rows[0]["nearest"]).name == "002.png" and rows[0]["distance"] == pytest.approx(
            0, abs=1e-6
        )
        assert rows[1]["ratio"] > 0.1


def test_adherence_bright_box_rate_one_versus_zero(tmp_path):
    rng = np.random.default_rng(3)
    plain = [np.clip(rng.normal(60, 10, (SIZE, SIZE)), 0, 255) for _ in range(4)]
    bright = [p.copy() for p in plain]
    for b in bright:
        b[40:60, 4:28] = 230  # lower-left box
    box = {"name": "region_intensity", "box": [0.625, 0.0625, 0.9375, 0.4375], "threshold": 0.5}
    ldm = {
        "spatial_dims": 2,
        "intensity": RANGE,
        "diversity": {"enabled": False},
        "adherence": {
            "no_finding": str(write_set(tmp_path / "none", plain)),
            "findings": [
                {
                    "name": "lower-left opacity",
                    "prompt": "left effusion",
                    "images": str(write_set(tmp_path / "left", bright)),
                    "detector": box,
                }
            ],
        },
    }
    rc, report = run_config(tmp_path, ldm, table=str(tmp_path / "out" / "table.txt"))
    assert rc == 0
    row = report["adherence"][0]
    assert (row["rate"], row["no_finding_rate"], row["difference"]) == (1.0, 0.0, 1.0)
    assert "lower-left opacity" in (tmp_path / "out" / "table.txt").read_text()


def tiny_resnet_weights(path: Path) -> Path:
    torch.manual_seed(0)
    net = ResNet(
        "basic",
        [1, 1, 1, 1],
        [64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,
        widen_factor=0.125,
        feed_forward=False,
    )
    torch.save(net.state_dict(), path)
    return path


def test_fid_with_a_tiny_user_network_is_zero_for_identical_sets(tmp_path):
    rng = np.random.default_rng(4)
    real = write_set(tmp_path / "real", [smooth(rng) for _ in range(6)])
    other = write_set(tmp_path / "other", [rng.integers(0, 256, (SIZE, SIZE)) for _ in range(6)])
    weights = tiny_resnet_weights(tmp_path / "resnet.pt")
    fid = {"weights": str(weights), "image_size": 64}
    base = {"spatial_dims": 2, "real": str(real), "intensity": RANGE, "ssim": SSIM, "fid": fid}
    rc, same = run_config(tmp_path, {**base, "synthetic": str(real)})
    assert rc == 0 and abs(same["fid"]["fid"]) < 1e-3
    rc, differ = run_config(tmp_path, {**base, "synthetic": str(other)})
    assert rc == 0 and differ["fid"]["fid"] > 1e-2


def test_xrv_densenet_state_dict_loads_strictly_and_gives_monai_features(tmp_path):
    torch.manual_seed(0)
    monai_net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).eval()
    xrv = {
        re.sub(r"\.layers\.", ".", k).replace("class_layers.out", "classifier"): v
        for k, v in monai_net.state_dict().items()
    }
    xrv["op_threshs"] = torch.rand(18)
    torch.save(xrv, tmp_path / "xrv.pt")
    net = load_xrv_densenet(tmp_path / "xrv.pt", torch.device("cpu"))
    x = torch.rand(2, 1, 224, 224) * 2048 - 1024
    with torch.no_grad():
        expected = monai_net.class_layers[:3](monai_net.features(x))
        assert torch.allclose(net.network(x), expected, atol=1e-5)
    del xrv["features.norm5.weight"]
    torch.save(xrv, tmp_path / "broken.pt")
    with pytest.raises(Exception, match=r"(?s)\$\.ldm\.fid\.weights.*features\.norm5\.weight"):
        load_xrv_densenet(tmp_path / "broken.pt", torch.device("cpu"))


def test_reconstruction_with_a_tiny_autoencoder(tmp_path):
    torch.manual_seed(0)
    vae = build_ldm_network(get_ldm_preset("tiny-ldm-2d"), "autoencoder")
    torch.save(vae.state_dict(), tmp_path / "ae.pt")
    rng = np.random.default_rng(5)
    held = write_set(tmp_path / "held", [smooth(rng, 30) for _ in range(2)])  # padded to 30 -> 30 (factor 2)
    ldm = {
        "spatial_dims": 2,
        "intensity": RANGE,
        "ssim": {"kernel_size": 3, "scales": 2},
        "reconstruction": {
            "enabled": True,
            "preset": "tiny-ldm-2d",
            "autoencoder": str(tmp_path / "ae.pt"),
            "held_out": str(held),
        },
    }
    rc, report = run_config(tmp_path, ldm)
    assert rc == 0
    rec = report["reconstruction"]
    assert len(rec["cases"]) == 2 and rec["cases"][0]["shape"] == [30, 30]
    assert all(0 < c["psnr"] < 60 and -1 <= c["ssim"] < 1 and c["ms_ssim"] is not None for c in rec["cases"])


def test_volumes_diversity_with_fewer_scales_and_25d_fid(tmp_path):
    rng = np.random.default_rng(6)
    affine = centred_affine((24, 24, 24), (1.1, 1.1, 1.1))
    for name in ("real", "syn"):
        for i in range(3):
            write_volume(
                tmp_path / name / f"{i}.nii.gz",
                Volume(rng.normal(size=(24, 24, 24)).astype(np.float32), affine),
            )
    ldm = {
        "spatial_dims": 3,
        "real": str(tmp_path / "real"),
        "synthetic": str(tmp_path / "syn"),
        "ssim": {"kernel_size": 3, "scales": 3},
        "fid": {"weights": str(tiny_resnet_weights(tmp_path / "r.pt")), "image_size": 32, "slice_step": 4},
    }
    torch.manual_seed(0)
    torch.save(
        build_ldm_network(get_ldm_preset("tiny-ldm-3d"), "autoencoder").state_dict(), tmp_path / "ae.pt"
    )
    ldm["reconstruction"] = {
        "enabled": True,
        "preset": "tiny-ldm-3d",
        "autoencoder": str(tmp_path / "ae.pt"),
        "held_out": [str(tmp_path / "real" / "0.nii.gz")],
    }
    rc, report = run_config(tmp_path, ldm)
    assert rc == 0
    assert len(report["ssim"]["ms_ssim_weights"]) == 3
    assert report["diversity"]["synthetic"]["ms_ssim_mean"] < 0.3
    assert set(report["fid"]) >= {"xy", "yz", "zx", "mean"} and report["fid"]["mean"] > 0
    case = report["reconstruction"]["cases"][0]
    assert case["shape"] == [24, 24, 24] and case["ms_ssim"] is not None and math.isfinite(case["psnr"])


def _bad(tmp_path: Path, case: str) -> tuple[dict, dict, str]:
    rng = np.random.default_rng(7)
    good = str(write_set(tmp_path / "good", [smooth(rng) for _ in range(3)]))
    ldm: dict = {"spatial_dims": 2, "synthetic": good, "intensity": RANGE, "ssim": SSIM}
    top: dict = {}
    if case == "no match":
        ldm["synthetic"] = str(tmp_path / "nothing" / "*.png")
        return ldm, top, "$.ldm.synthetic"
    if case == "shapes":
        write_png(tmp_path / "good" / "big.png", smooth(rng, SIZE + 8))
        return ldm, top, "$.ldm.synthetic"
    if case == "no autoencoder":
        ldm["reconstruction"] = {"enabled": True, "preset": "tiny-ldm-2d", "held_out": good}
        return ldm, top, "$.ldm.reconstruction.autoencoder"
    if case == "bad fid weights":
        (tmp_path / "w.pt").write_bytes(b"not a torch file")
        ldm.update(real=good, fid={"weights": str(tmp_path / "w.pt")})
        return ldm, top, "$.ldm.fid.weights"
    if case == "empty box":
        det = {"name": "region_intensity", "box": [0.5, 0.5, 0.5, 0.9], "threshold": 0.5}
        ldm["adherence"] = {"no_finding": good, "findings": [{"name": "x", "images": good, "detector": det}]}
        return ldm, top, "$.ldm.adherence.findings[0].detector.box"
    if case == "ct key":
        top["real_datalist"] = good
        return ldm, top, "$.real_datalist"
    if case == "3d xrv":
        ldm.update(spatial_dims=3, real=good, fid={"network": "xrv-densenet121", "weights": good})
        return ldm, top, "$.ldm.fid.network"
    if case == "report over an input":
        top["output"] = {"report": str(tmp_path / "good" / "000.png")}
        return ldm, top, "$.output.report"
    if case == "unknown key":
        ldm["diversity"] = {"pairs": 3}
        return ldm, top, "$.ldm.diversity"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "no match",
        "shapes",
        "no autoencoder",
        "bad fid weights",
        "empty box",
        "ct key",
        "3d xrv",
        "report over an input",
        "unknown key",
    ],
)
def test_bad_inputs_exit_2_naming_the_key_and_write_nothing(tmp_path, capsys, case):
    ldm, top, key = _bad(tmp_path, case)
    data = {"ldm": ldm, "output": {"report": str(tmp_path / "out" / "report.json")}, "device": "cpu", **top}
    (tmp_path / "c.json").write_text(json.dumps(data))
    before = sorted(tmp_path.rglob("*"))
    assert main(["--config", str(tmp_path / "c.json"), "--no-progress"]) == 2
    assert key in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_shipped_ldm_example_config_validates():
    from maisi.families.checks import load_checked_config

    config = load_checked_config(
        Path(__file__).parents[1] / "configs" / "evaluate_ldm_example.json", "evaluate"
    )
    assert config.ldm is not None and config.ldm.adherence is not None


def test_dry_run_checks_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(8)
    images = str(write_set(tmp_path / "s", [smooth(rng) for _ in range(3)]))
    data = {
        "ldm": {"spatial_dims": 2, "synthetic": images, "intensity": RANGE},
        "device": "cpu",
        "output": {"report": str(tmp_path / "out" / "r.json"), "table": str(tmp_path / "out" / "t.txt")},
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert main(["--config", str(tmp_path / "c.json"), "--dry-run"]) == 0
    assert not (tmp_path / "out").exists()
