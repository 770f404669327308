"""tools/fetch_brain_data.py without the network: a fake Debian package and a fake wheel, each holding a
small T1 volume, pinned by SHA-256 in a manifest; apt-get is replaced so nothing is downloaded."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi.data.io import read_volume
from maisi.training.ldm_data import read_ldm_dataset

REPO = Path(__file__).resolve().parents[1]
DEB_MEMBER = "usr/share/mricron/templates/ch2.nii.gz"
WHEEL_MEMBER = "nilearn/datasets/data/t1.nii.gz"


def _load_tool():
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("fetch_brain_data", REPO / "tools" / "fetch_brain_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nifti_bytes(shape: tuple[int, int, int], affine: np.ndarray, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 255, size=shape).astype(np.uint8)
    image = nib.Nifti1Image(data, affine)
    buffer = io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return gzip.compress(buffer.getvalue())


def ar_member(name: str, body: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    return header + body + (b"\n" if len(body) % 2 else b"")


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def fake(tmp_path):
    """(manifest, cache, the two volumes' bytes): a .deb (ar + data.tar.gz, the member under ./) kept
    outside the cache, for the faked apt-get, and a wheel already in the cache."""
    colin = nifti_bytes((9, 10, 8), np.diag([1.0, 1.0, 1.0, 1.0]), 0)
    mni = nifti_bytes((8, 9, 7), np.diag([-2.0, 2.0, 2.0, 1.0]), 1)  # LAS on disk: written RAS
    deb = b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
    deb += ar_member("control.tar.gz", tar_gz({"./control": b"Package: mricron-data\n"}))
    deb += ar_member("data.tar.gz", tar_gz({f"./{DEB_MEMBER}": colin, "./usr/share/doc/x": b"doc"}))
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(WHEEL_MEMBER, mni)
    wheel = wheel.getvalue()
    cache, server = tmp_path / "cache", tmp_path / "apt"
    cache.mkdir()
    server.mkdir()
    (server / "mricron-data_1_all.deb").write_bytes(deb)
    (cache / "nilearn-0-py3-none-any.whl").write_bytes(wheel)
    common = {"licence": "BSD-3-clause (test)", "attribution": "a test volume"}
    manifest = {
        "name": "test-brain",
        "sources": {
            "colin27": {
                "kind": "deb",
                "package": "mricron-data",
                "version": "1",
                "archive": "mricron-data_1_all.deb",
                "sha256": sha(deb),
                "member": DEB_MEMBER,
                "member_sha256": sha(colin),
                **common,
            },
            "mni152": {
                "kind": "wheel",
                "package": "nilearn",
                "version": "0",
                "archive": "nilearn-0-py3-none-any.whl",
                "sha256": sha(wheel),
                "member": WHEEL_MEMBER,
                "member_sha256": sha(mni),
                **common,
            },
        },
    }
    path = tmp_path / "brain_data.json"
    path.write_text(json.dumps(manifest))
    return path, cache, server


@pytest.fixture
def apt(monkeypatch, fake):
    """apt-get download replaced by a copy from the fake server folder; the calls are recorded."""
    calls = []

    def download(package, version, folder):
        calls.append(f"{package}={version}")
        shutil.copy(fake[2] / f"{package}_{version}_all.deb", folder)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(tool, "run_apt_download", download)
    return calls


def test_builds_a_decathlon_dataset_with_sources_and_licences(tmp_path, fake, apt, capsys):
    manifest, cache, _ = fake
    dest = tmp_path / "brain"
    args = ["--manifest", str(manifest), "--cache", str(cache), "--dest", str(dest)]
    assert tool.main(args) == 0
    assert apt == ["mricron-data=1"]  # the wheel was in the cache: no download
    data = json.loads((dest / "dataset.json").read_text())
    assert data["modality"] == {"0": "T1"}
    assert [e["image"] for e in data["training"]] == ["./imagesTr/colin27.nii.gz", "./imagesTr/mni152.nii.gz"]
    assert {s["source"]: s["licence"] for s in data["sources"]} == {
        "colin27": "BSD-3-clause (test)",
        "mni152": "BSD-3-clause (test)",
    }
    mni = read_volume(dest / "imagesTr" / "mni152.nii.gz")
    assert mni.array.dtype == np.float32 and mni.array.shape == (8, 9, 7)
    assert np.allclose(np.diag(mni.affine)[:3], [2.0, 2.0, 2.0])  # RAS, 2 mm
    # the training code reads it, channel by name
    dataset = read_ldm_dataset(dest / "dataset.json", None, "T1")
    assert dataset.layout == "decathlon" and len(dataset.entries) == 2
    # a second run converts nothing
    capsys.readouterr()
    assert tool.main(args) == 0
    assert capsys.readouterr().out.count("up to date") == 2


def test_a_member_other_than_the_pinned_one_is_refused(tmp_path, fake, apt, capsys):
    manifest, cache, _ = fake
    data = json.loads(manifest.read_text())
    data["sources"]["mni152"]["member_sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    dest = tmp_path / "brain"
    assert tool.main(["--manifest", str(manifest), "--cache", str(cache), "--dest", str(dest)]) == 2
    assert "nilearn/datasets/data/t1.nii.gz has SHA-256" in capsys.readouterr().err
    assert not (dest / "imagesTr" / "mni152.nii.gz").exists()
    assert json.loads((dest / "dataset.json").read_text())["numTraining"] == 1  # colin27 only


def test_a_download_other_than_the_pinned_archive_and_unknown_sources_are_refused(
    tmp_path, fake, apt, capsys
):
    manifest, cache, _ = fake
    data = json.loads(manifest.read_text())
    data["sources"]["colin27"]["sha256"] = "1" * 64
    manifest.write_text(json.dumps(data))
    args = ["--manifest", str(manifest), "--cache", str(cache), "--dest", str(tmp_path / "b")]
    assert tool.main([*args, "--sources", "colin27"]) == 2
    assert "does not match the pinned" in capsys.readouterr().err
    assert not (cache / "mricron-data_1_all.deb").exists()
    assert tool.main([*args, "--sources", "nope"]) == 2
    assert "unknown source(s) nope" in capsys.readouterr().err
