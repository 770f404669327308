"""``maisi.generation.pipeline.Pipeline``: the CLI's run in memory; the same image for the same seed, the
same refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import read_volume
from maisi.errors import InputError
from maisi.generation.pipeline import GeneratedSample, Pipeline
from tests.test_infer import BROKEN, broken_config, run_cli


@pytest.mark.parametrize("mode", ["mask", "image-only"])
def test_a_seed_gives_the_image_the_cli_writes(mode, infer_config, tmp_path):
    changes = {} if mode == "mask" else {"mask": "<drop>", "output_size": [32, 32, 16], "spacing": [2, 2, 3]}
    config = infer_config(seed=3, **changes)
    assert run_cli(config) == 0
    out = tmp_path / "out"
    written = json.loads((out / "sample_seed3.json").read_text())

    pipe = Pipeline.from_config(config)
    pipe.check_inputs()
    sample = pipe(3)
    assert isinstance(sample, GeneratedSample)
    image = read_volume(out / "sample_seed3_image.nii.gz")
    assert np.array_equal(sample.image.array, image.array)
    assert np.allclose(sample.image.affine, image.affine, atol=1e-5)
    if mode == "mask":
        assert np.array_equal(sample.mask.array, read_volume(out / "sample_seed3_label.nii.gz").array)
    else:
        assert sample.mask is None
    for key in ("seed", "shape", "hu_min_max", "conditions", "sampler", "quality_check", "mask_fidelity"):
        assert json.loads(json.dumps(sample.metadata[key])) == written[key], key  # tuples are lists in JSON
    assert set(sample.metadata) < set(written)  # the run adds only what concerns the files and the job
    assert pipe.plan().shape == tuple(image.shape)


def test_the_default_seed_is_the_configs_and_nothing_is_written(infer_config, tmp_path):
    pipe = Pipeline.from_config(infer_config(seed=5), num_samples=1)
    assert pipe.seeds == range(5, 6)
    assert pipe().metadata["seed"] == 5
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, fragment", [(c, f) for _, c, f in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_check_inputs_refuses_what_the_cli_refuses(
    changes, fragment, infer_config, tiny_checkpoints, tmp_path
):
    config = broken_config(changes, infer_config, tiny_checkpoints, tmp_path)
    with pytest.raises(InputError) as refused:
        Pipeline.from_config(config).check_inputs()
    assert fragment in str(refused.value)


def test_a_config_of_many_masks_is_left_to_the_cli(infer_config, mask_file):
    pipe = Pipeline.from_config(infer_config(mask="<drop>", masks=[str(mask_file)]))
    with pytest.raises(InputError, match=r"\$\.masks: a Pipeline generates from one input"):
        pipe.check_inputs()


def test_anatomy_seeds_outside_the_database_picks_are_refused(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    pipe = Pipeline.from_config(repo / "configs" / "inference_anatomy.json", num_samples=1, device="cpu")
    with pytest.raises(InputError, match="picks are made for seeds"):
        pipe(pipe.config.seed + 1)
