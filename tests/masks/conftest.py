"""Real masks in MAISI ids for the mask-database tests, prepared once per session.

- ``ts.nii.gz``: TotalSegmentator's example segmentation remapped with ``maisi.labels`` (abdomen and lower
  chest, 122 x 101 x 30 voxels of 3 mm);
- ``chest.nrrd``: the slicerio chest segmentation (3D Slicer, NRRD, LPS) remapped with a test mapping that
  calls its lungs upper lobes (MAISI has lobes only) and its tissue body;
- ``ts_tumour.nii.gz``: ``ts.nii.gz`` with a block of its left lower lung lobe relabelled lung tumour (23).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import read_mask, write_volume
from maisi.labels import load_label_dict
from maisi.labels.mapping import load_mapping, remap

DATA = Path(__file__).resolve().parents[1] / "data"
SLICERIO_TEST_MAPPING = {
    "description": "test only: slicerio chest segments -> MAISI names (whole lungs called upper lobes)",
    "mapping": [
        {"source_id": 5, "source_name": "right lung", "target": "right lung upper lobe"},
        {"source_id": 6, "source_name": "left lung", "target": "left lung upper lobe"},
        {"source_id": 7, "source_name": "tissue", "target": "body"},
    ],
}


@pytest.fixture(scope="session")
def real_masks(tmp_path_factory) -> Path:
    """A folder holding ``masks/`` with the three real masks (do not modify; copy it first)."""
    root = tmp_path_factory.mktemp("real_masks")
    label_dict = load_label_dict()
    ts = read_mask(DATA / "totalseg_example_seg.nii.gz")
    ts_maisi, _ = remap(ts.array, load_mapping("totalsegmentator", label_dict))
    write_volume(root / "masks" / "ts.nii.gz", ts.with_array(ts_maisi))
    mapping_file = root / "slicerio_mapping.json"
    mapping_file.write_text(json.dumps(SLICERIO_TEST_MAPPING))
    chest = read_mask(DATA / "slicerio_Segmentation.seg.nrrd")
    chest_maisi, _ = remap(chest.array, load_mapping(str(mapping_file), label_dict))
    write_volume(root / "masks" / "chest.nrrd", chest.with_array(chest_maisi))
    tumour = ts_maisi.copy()
    lobe = np.argwhere(tumour == 29)  # left lung lower lobe
    x, y, z = lobe[len(lobe) // 2]
    block = tumour[x - 2 : x + 3, y - 2 : y + 3, z - 2 : z + 3]
    block[block == 29] = 23
    write_volume(root / "masks" / "ts_tumour.nii.gz", ts.with_array(tumour))
    return root


@pytest.fixture
def masks_copy(real_masks, tmp_path) -> Path:
    """A private copy of ``real_masks`` (tests may add, change or delete masks)."""
    return Path(shutil.copytree(real_masks, tmp_path / "db"))
