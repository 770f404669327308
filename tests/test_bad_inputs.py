"""Every CLI on a table of bad inputs: exit 2, a message naming the key, file or value, and not a byte
written.

Each case builds its inputs in a fresh workspace, snapshots the whole workspace, runs the CLI and checks that
the snapshot is unchanged: no output, no temporary, no touched input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import Volume, write_volume
from tests.conftest import phantom_mask, write_config

DATA = Path(__file__).parent / "data"


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _infer_config(ws: Path, ckpt: dict, **changes) -> list[str]:
    data = {
        "preset": "tiny-rflow",
        "checkpoints": {part: str(p) for part, p in ckpt.items()},
        "mask": str(ws / "mask.nii.gz"),
        "sampling": {"num_inference_steps": 2},
        "output": {"dir": str(ws / "out")},
        "device": "cpu",
    }
    data.update(changes)
    return ["--config", str(write_config(ws / "infer.json", data))]


def _mask(ws: Path, array: np.ndarray | None = None) -> Path:
    return write_volume(
        ws / "mask.nii.gz", Volume(phantom_mask() if array is None else array, np.diag([2.0, 2, 3, 1]))
    )


def infer_nan_spacing(ws, ckpt):
    _mask(ws)
    (ws / "infer.json").write_text(
        json.dumps(
            {
                "preset": "tiny-rflow",
                "checkpoints": {k: str(v) for k, v in ckpt.items()},
                "output_size": [32, 32, 16],
                "output": {"dir": str(ws / "out")},
            }
        )[:-1]
        + ', "spacing": [1.0, NaN, 2.0]}'
    )
    return "maisi.infer", ["--config", str(ws / "infer.json")], "$.spacing[1]: got NaN"


def infer_blank_mask(ws, ckpt):
    _mask(ws, np.zeros((32, 32, 16), np.uint8))
    return "maisi.infer", _infer_config(ws, ckpt), "has no labelled voxel"


def infer_missing_checkpoint_dry_run(ws, ckpt):
    _mask(ws)
    args = _infer_config(ws, {**ckpt, "controlnet": ws / "nowhere.pt"})
    return "maisi.infer", [*args, "--dry-run"], "nowhere.pt"


def infer_output_is_a_file(ws, ckpt):
    _mask(ws)
    (ws / "out").write_text("not a folder")
    return "maisi.infer", _infer_config(ws, ckpt), "is a file, not a folder"


def infer_seed_beyond_the_schema(ws, ckpt):
    _mask(ws)
    return "maisi.infer", [*_infer_config(ws, ckpt), "--seed", str(2**70)], "--seed"


def infer_config_not_utf8(ws, ckpt):
    (ws / "infer.json").write_bytes(b'{"preset": "tiny-rflow", "note": "\xe9"}')
    return "maisi.infer", ["--config", str(ws / "infer.json")], "not UTF-8"


def encode_output_on_the_data(ws, ckpt):
    case = ws / "c0"
    write_volume(case / "ct.nii.gz", Volume(np.zeros((32, 32, 16), np.float32), np.eye(4)))
    _mask(case)
    (case / "mask.nii.gz").rename(case / "ct_label.nii.gz")
    (ws / "datalist.json").write_text(
        json.dumps({"training": [{"image": "c0/ct.nii.gz", "label": "c0/ct_label.nii.gz"}]})
    )
    config = write_config(
        ws / "encode.json",
        {
            "preset": "tiny-rflow",
            "autoencoder": str(ckpt["autoencoder"]),
            "datalist": str(ws / "datalist.json"),
            "output_dir": str(ws),
        },
    )
    return "maisi.encode", ["--config", str(config)], "ct_label.nii.gz"


def train_output_is_a_file(ws, ckpt):
    (ws / "run").write_text("a file")
    (ws / "datalist.json").write_text(json.dumps({"training": []}))
    config = write_config(
        ws / "train.json",
        {
            "preset": "tiny-rflow",
            "datalist": str(ws / "datalist.json"),
            "output_dir": str(ws / "run"),
            "steps": 1,
        },
    )
    return "maisi.train", ["diffusion", "--config", str(config)], "is a file, not a folder"


def evaluate_report_is_a_folder(ws, ckpt):
    (ws / "report").mkdir()
    (ws / "real.json").write_text(json.dumps({"training": [{"image": "ct.nii.gz"}]}))
    write_volume(ws / "ct.nii.gz", Volume(np.zeros((32, 32, 32), np.float32), np.eye(4)))
    config = write_config(
        ws / "evaluate.json",
        {
            "real_datalist": str(ws / "real.json"),
            "reconstruction": {"preset": "tiny-rflow", "autoencoder": str(ckpt["autoencoder"])},
            "output": {"report": str(ws / "report"), "montage": None},
        },
    )
    return "maisi.evaluate", ["--config", str(config)], "$.output.report"


def labels_show_a_folder(ws, ckpt):
    (ws / "dict").mkdir()
    return "maisi.labels", ["show", "--label-dict", str(ws / "dict")], "dict"


def labels_envelope_nan_threshold(ws, ckpt):
    _mask(ws)
    write_volume(ws / "ct.nii.gz", Volume(np.zeros((32, 32, 16), np.float32), np.diag([2.0, 2, 3, 1])))
    args = [
        "envelope",
        "--image",
        str(ws / "ct.nii.gz"),
        "--mask",
        str(ws / "mask.nii.gz"),
        "--output",
        str(ws / "out.nii.gz"),
        "--threshold",
        "nan",
    ]
    return "maisi.labels", args, "--threshold"


def labels_crop_onto_its_input(ws, ckpt):
    _mask(ws)
    write_volume(ws / "ct.nii.gz", Volume(np.zeros((32, 32, 16), np.float32), np.diag([2.0, 2, 3, 1])))
    args = [
        "crop",
        "--image",
        str(ws / "ct.nii.gz"),
        "--mask",
        str(ws / "mask.nii.gz"),
        "--around",
        "1",
        "--size-mm",
        "20",
        "20",
        "20",
        "--output-image",
        str(ws / "ct.nii.gz"),
        "--output-mask",
        str(ws / "crop_mask.nii.gz"),
    ]
    return "maisi.labels", args, "--output-image"


def datalist_validate_duplicates(ws, ckpt):
    write_volume(ws / "ct.nii.gz", Volume(np.zeros((32, 32, 16), np.float32), np.eye(4)))
    (ws / "dl.json").write_text(json.dumps({"training": [{"image": "ct.nii.gz"}, {"image": "./ct.nii.gz"}]}))
    return "maisi.datalist", ["validate", "--datalist", str(ws / "dl.json")], "ct.nii.gz"


def masks_query_unknown_anatomy(ws, ckpt):
    _mask(ws)
    (ws / "db.json").write_text("[]")
    args = [
        "query",
        "--database",
        str(ws / "db.json"),
        "--anatomy",
        "livver",
        "--output-size",
        "32",
        "32",
        "16",
        "--spacing",
        "2",
        "2",
        "3",
    ]
    return "maisi.masks", args, "livver"


def download_plain_http(ws, ckpt):
    args = ["--variant", "rflow-ct", "--dest", str(ws / "weights"), "--base-url", "http://mirror.example.org"]
    return "maisi.download", args, "http"


CASES: list[Callable] = [
    infer_nan_spacing,
    infer_blank_mask,
    infer_missing_checkpoint_dry_run,
    infer_output_is_a_file,
    infer_seed_beyond_the_schema,
    infer_config_not_utf8,
    encode_output_on_the_data,
    train_output_is_a_file,
    evaluate_report_is_a_folder,
    labels_show_a_folder,
    labels_envelope_nan_threshold,
    labels_crop_onto_its_input,
    datalist_validate_duplicates,
    masks_query_unknown_anatomy,
    download_plain_http,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_naming_it_and_writes_nothing(
    case, tmp_path, tiny_checkpoints, capsys, monkeypatch
):
    from maisi.__main__ import cli_module

    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    module, argv, fragment = case(ws, tiny_checkpoints["tiny-rflow"])
    before = snapshot(ws)
    capsys.readouterr()
    try:
        code = cli_module(module).main(argv)
    except SystemExit as exit_:  # argparse's own refusals (bad flag values) exit 2 through SystemExit
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and "Traceback" not in err, err
    assert snapshot(ws) == before
