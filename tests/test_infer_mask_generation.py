"""Anatomy mode with a size request (MAISI's Path A): the mask is generated, then the CT from it.

Tiny random networks for the plumbing (the seeded random mask generator gives a mask of nearly every label,
a gallbladder among them); a crafted generator output (monkeypatched) for what the sizes and the lost-organ
check must do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.checkpoints import save_checkpoint
from maisi.data.io import read_mask, read_volume
from maisi.errors import InputError
from maisi.families.ct import PARTS
from maisi.families.mask import get_mask_preset
from maisi.infer import main
from maisi.masks import generation
from maisi.masks.networks import build_mask_network
from maisi.masks.sizes import SIZE_SLOTS, build_size_reference, organ_volumes_ml, reference_json
from tests.conftest import write_config

MASK_PRESET = "tiny-mask-ddpm"
CPU = torch.device("cpu")
GRID = {"output_size": [48, 48, 48], "spacing": [8.0, 8.0, 8.0]}
TABLE = [
    [0.2, 0.2, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1],
    [0.8, 0.8, 0.5, 0.5, 0.5, -1, -1, 0.4, -1, -1],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.3, -1, -1, -1, -1],
]


@pytest.fixture(scope="module")
def mask_generator(tmp_path_factory) -> dict[str, Path]:
    """Tiny mask VAE and UNet (random, seeded) in our checkpoint format, a size table and a reference."""
    folder = tmp_path_factory.mktemp("mask_generator")
    preset = get_mask_preset(MASK_PRESET)
    torch.manual_seed(
        1
    )  # a seed whose random generator keeps a gallbladder on the test grid (seeds 0, 4 do not)
    files = {
        "autoencoder": save_checkpoint(
            folder / "mask_vae.pt", build_mask_network(preset, "autoencoder"), preset, "mask_autoencoder"
        ),
        "diffusion_unet": save_checkpoint(
            folder / "mask_unet.pt",
            build_mask_network(preset, "diffusion_unet"),
            preset,
            "mask_diffusion_unet",
            scale_factor=1.0,
        ),
    }
    files["size_conditions"] = folder / "sizes.json"
    files["size_conditions"].write_text(json.dumps([{"organ_size": row} for row in TABLE]))
    # reference: livers of 1000, 1500 and 2000 mL, each other slot one volume
    volumes = np.ones((3, 10))
    volumes[:, 1] = [1000.0, 1500.0, 2000.0]
    files["size_reference"] = folder / "reference.json"
    files["size_reference"].write_text(json.dumps(reference_json(build_size_reference(volumes), "test")))
    return files


@pytest.fixture
def size_config(tmp_path, tiny_checkpoints, mask_generator):
    def make(sizes, **generator) -> Path:
        data = {
            "preset": "tiny-rflow",
            "checkpoints": {part: str(p) for part, p in tiny_checkpoints["tiny-rflow"].items()},
            "anatomy": {
                "controllable_anatomy_size": sizes,
                "mask_generator": {
                    "preset": MASK_PRESET,
                    **{k: str(p) for k, p in mask_generator.items()},
                    "scheduler": "ddim",  # DDPM must run all 1000 steps
                    "num_inference_steps": 3,
                    **generator,
                },
            },
            **GRID,
            "sampling": {"num_inference_steps": 2},
            "output": {"dir": str(tmp_path / "out")},
            "quality_check": {"max_tries": 1},
            "device": "cpu",
        }
        return write_config(tmp_path / "sizes.json", data)

    return make


def crafted_mask(liver_voxels_per_axis: int) -> np.ndarray:
    """A generator output on the tiny preset's grid: body with a cubic liver of the given edge."""
    shape = get_mask_preset(MASK_PRESET).mask_shape
    mask = np.zeros(shape, dtype=np.int16)
    mask[8:-8, 8:-8, 8:-8] = 200
    c, h = shape[0] // 2, liver_voxels_per_axis // 2
    mask[c - h : c - h + liver_voxels_per_axis, c - h : c - h + liver_voxels_per_axis, c - h : c + h] = 1
    return mask


def test_a_size_request_generates_the_mask_then_the_ct_with_the_records(size_config, tmp_path):
    config = size_config([["hepatic tumor", -1], ["colon", -1], ["gallbladder", 0.2]])
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    meta = json.loads((out / "sample_seed0.json").read_text())
    label, image = (
        read_mask(out / "sample_seed0_label.nii.gz"),
        read_volume(out / "sample_seed0_image.nii.gz"),
    )
    assert label.shape == image.shape == tuple(GRID["output_size"])
    assert np.allclose(label.spacing, GRID["spacing"]) and np.allclose(label.affine, image.affine)
    record = meta["anatomy"]
    assert record["request"] == {
        "controllable_anatomy_size": [["hepatic tumor", -1.0], ["colon", -1.0], ["gallbladder", 0.2]]
    }
    # nearest row by L1 over the named slots: row 0 (|-1 - -1| + |-1 - 0.5| + |0.2 - 0.2|; row 2: 1.8),
    # then the named values written in
    assert record["size_table_row"] == 0 and record["size_table_distance"] == 1.5
    assert list(record["conditioning_sizes"].values()) == [*TABLE[0][:4], -1, *TABLE[0][5:]]
    assert record["generator"]["preset"] == MASK_PRESET and record["generator"]["steps"] == 3
    assert set(record["generator"]["files"]) == {
        "autoencoder",
        "diffusion_unet",
        "size_conditions",
        "size_reference",
    }
    assert set(record["achieved"]["volumes_ml"]) == set(SIZE_SLOTS)
    assert record["resampling"]["to"]["shape"] == GRID["output_size"]
    # a rerun skips the finished sample: no mask is generated again
    assert main(["--config", str(config)]) == 0


def test_the_snapped_sizes_condition_the_unet_and_the_achieved_size_is_measured(
    size_config, tmp_path, monkeypatch
):
    seen = {}

    def fake(plan, seed, progress=False):
        seen["context"] = plan.snap.final
        return crafted_mask(16)

    monkeypatch.setattr(generation, "sample_mask_labels", fake)
    assert main(["--config", str(size_config([["liver", 0.7]]))]) == 0
    # row 1 is nearest to liver 0.7 (|0.8 - 0.7|); the request overwrites its liver slot
    assert seen["context"] == tuple([0.8, 0.7, *TABLE[1][2:]])
    record = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())["anatomy"]
    spacing = get_mask_preset(MASK_PRESET).spacing_mm
    liver_ml = organ_volumes_ml(crafted_mask(16), [spacing] * 3)[1]
    assert record["achieved"]["volumes_ml"]["liver"] == pytest.approx(liver_ml, abs=1e-3)
    assert 0 < record["achieved"]["sizes"]["liver"] < 1
    assert record["organ_volumes_ml"]["liver"] > 0


def test_a_slot_the_size_reference_lacks_has_a_null_size_with_its_reason(
    size_config, mask_generator, tmp_path, monkeypatch
):
    reference = json.loads(mask_generator["size_reference"].read_text())
    reference["size_reference"]["bone lesion"] = []  # no training mask held a bone lesion
    path = tmp_path / "no_bone_lesion.json"
    path.write_text(json.dumps(reference))
    monkeypatch.setattr(generation, "sample_mask_labels", lambda plan, seed, progress=False: crafted_mask(16))
    assert main(["--config", str(size_config([["liver", 0.7]], size_reference=str(path)))]) == 0
    achieved = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())["anatomy"]["achieved"]
    assert achieved["sizes"]["bone lesion"] is None and 0 < achieved["sizes"]["liver"] < 1
    assert achieved["reasons"] == {"bone lesion": "not checked: the size reference has no bone lesion"}


def test_an_organ_lost_by_the_resampling_fails_the_sample_naming_it(
    size_config, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(generation, "sample_mask_labels", lambda plan, seed, progress=False: crafted_mask(2))
    config = size_config([["liver", 0.5]])
    data = json.loads(config.read_text())
    data.update(output_size=[16, 16, 16], spacing=[20.0, 20.0, 20.0])
    config.write_text(json.dumps(data))
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "resampled mask does not contain required class labels 'liver'" in err
    assert not list((tmp_path / "out").glob("sample_seed0_image*"))


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"size_conditions": "<missing>"}, "$.anatomy.mask_generator.size_conditions: "),
        (
            {"preset": "small-mask-ddpm"},
            "mask_unet.pt: mask_diffusion_unet checkpoint",
        ),  # tiny weights, small preset
        (
            {"preset": "tiny-mask-ddpn"},
            "preset: unknown mask preset 'tiny-mask-ddpn'. Did you mean 'tiny-mask-ddpm'?",
        ),
    ],
)
def test_bad_generator_inputs_exit_2_and_write_nothing(size_config, tmp_path, change, fragment, capsys):
    if change.get("size_conditions") == "<missing>":
        change = {"size_conditions": str(tmp_path / "nowhere.json")}
    assert main(["--config", str(size_config([["liver", 0.5]], **change))]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_size_table_narrower_than_the_unet_is_refused(size_config, tmp_path, capsys):
    table = tmp_path / "narrow.json"
    table.write_text(json.dumps([{"organ_size": [0.5] * 9}]))
    assert main(["--config", str(size_config([["liver", 0.5]], size_conditions=str(table)))]) == 2
    assert str(table) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_tumours_are_refused_as_maisi_does(size_config, tmp_path, capsys):
    config = size_config([["hepatic tumor", 0.3], ["lung tumor", 0.3]])
    assert main(["--config", str(config)]) == 2
    assert "$.anatomy.controllable_anatomy_size[1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_generated_masks_bars_show_and_no_progress_silences_them(size_config, tmp_path, capfd):
    def bars(text: str) -> list[str]:
        marks = ("%|", "it/s", "s/it")
        return [line for line in text.replace("\r", "\n").splitlines() if any(m in line for m in marks)]

    config = size_config([["colon", -1], ["gallbladder", 0.2]])
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "shown")]) == 0
    shown = bars(capfd.readouterr().err)
    # the mask's DDPM (3 steps) and its tiled decode (64^3 labels), then the CT's denoising (2 steps)
    assert any("/3 [" in line and "denoising" in line for line in shown), shown  # the mask's: 3 steps
    assert any("tiled decoder" in line for line in shown), shown
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "quiet"), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert bars(err) == [], err
    assert (tmp_path / "quiet" / "sample_seed0_label.nii.gz").is_file()


def test_a_mask_stage_that_cannot_fit_is_refused_with_exit_2_and_nothing_written(
    size_config, tmp_path, monkeypatch, capsys
):
    from maisi.config import load_config
    from maisi.generation import memory as generation_memory
    from maisi.generation import plan as ct_generation

    config = size_config([["liver", 0.5]])
    plan = ct_generation.plan_generation(load_config(config, "infer"), torch.device("cpu"))
    stages = generation_memory.estimate_stages(plan, torch.device("cpu"))
    assert list(stages) == ["mask", "CT"]  # in the order they run
    mask_need, ct_need = stages["mask"].host_bytes, stages["CT"].host_bytes
    assert ct_need < mask_need  # the tiny CT grid fits where the 64^3 mask decode does not
    monkeypatch.setattr(generation_memory, "available_ram_bytes", lambda: mask_need - 1)
    for flags in ((), ("--dry-run",)):
        assert main(["--config", str(config), *flags]) == 2
        err = capsys.readouterr().err
        assert (
            "$.anatomy.controllable_anatomy_size: generating its 64 x 64 x 64 mask (the mask stage) needs at "
            "least" in err
        ), err
        assert f"mask preset '{MASK_PRESET}'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(generation_memory, "available_ram_bytes", lambda: mask_need)
    assert main(["--config", str(config)]) == 0


def test_a_ct_stage_that_cannot_fit_after_a_generated_mask_is_named(size_config, monkeypatch):
    from maisi.config import load_config
    from maisi.generation import memory as generation_memory
    from maisi.generation import plan as ct_generation
    from maisi.masks import memory

    plan = ct_generation.plan_generation(load_config(size_config([["liver", 0.5]]), "infer"), CPU)
    small = memory.MaskStageMemory(1000, 0, {"weights": 10})  # a mask stage that fits anywhere
    monkeypatch.setattr(memory, "estimate_mask_memory", lambda generator: small)
    ct_need = generation_memory.estimate_stages(plan, CPU)["CT"].host_bytes
    monkeypatch.setattr(generation_memory, "available_ram_bytes", lambda: ct_need - 1)
    with pytest.raises(
        InputError, match=r"^\$\.output_size: the CT stage on a 48 x 48 x 48 grid needs at least"
    ):
        generation_memory.check_memory(plan, CPU)


def test_each_stage_counts_the_other_stages_networks(size_config):
    from maisi.config import load_config
    from maisi.generation import memory as generation_memory
    from maisi.generation import plan as ct_generation
    from maisi.masks.memory import estimate_mask_memory

    plan = ct_generation.plan_generation(load_config(size_config([["liver", 0.5]]), "infer"), CPU)
    assert plan.anatomy is not None and plan.anatomy.generator is not None
    mask = estimate_mask_memory(plan.anatomy.generator)
    nets = plan.anatomy.generator.networks
    mask_weights = sum(p.numel() * 4 for n in (nets.autoencoder, nets.diffusion_unet) for p in n.parameters())
    assert mask.parts["weights"] == mask_weights
    ct_weights = sum(os.path.getsize(getattr(plan.config.checkpoints, p)) for p in PARTS)
    stages = generation_memory.estimate_stages(plan, CPU)
    assert stages["mask"].host_bytes == mask.host_bytes + ct_weights
    assert (
        stages["CT"].host_bytes == generation_memory.estimate_ct_memory(plan, CPU).host_bytes + mask_weights
    )
    assert generation_memory.estimate_memory(plan, CPU).host_bytes == max(
        s.host_bytes for s in stages.values()
    )


def _reference_without_livers(tmp_path) -> Path:
    volumes = np.ones((3, 10))
    volumes[:, 1] = 0.0  # masks without a liver
    path = tmp_path / "no_livers.json"
    path.write_text(json.dumps(reference_json(build_size_reference(volumes), "test: no livers")))
    return path


def _rows_of_9(tmp_path) -> Path:
    path = tmp_path / "rows_of_9.json"
    path.write_text(json.dumps([{"organ_size": row[:9]} for row in TABLE]))
    return path


WHERE = "$.anatomy.controllable_anatomy_size"


@pytest.mark.parametrize(
    "sizes, generator, fragment",
    [
        ([["liver", 1.5]], {}, f"{WHERE}[0]: size 1.5 of 'liver' is outside [0, 1] and not -1 (absent)"),
        ([["Liver", 0.5]], {}, f"{WHERE}[0]: unknown name 'Liver'; did you mean 'liver'?"),
        ([["liver"]], {}, f'{WHERE}[0]: got ["liver"]'),
        ([[s, 0.5] for s in SIZE_SLOTS] + [["liver", 0.2]], {}, f"{WHERE}: 11 entries; at most 10"),
        ([["hepatic tumor", -1]], {}, f"{WHERE}: every size is -1 (absent)"),
        ([], {}, f"{WHERE}: empty, but $.anatomy.mask_generator is set"),
        ([["liver", 0.5]], {"size_conditions": _rows_of_9}, "row 0 ($[0].organ_size): 9 values, expected 10"),
        (
            [["colon", -1], ["liver", 0.5]],
            {"size_reference": _reference_without_livers},
            "$.anatomy.mask_generator.size_reference: ",
        ),
    ],
    ids=["size 1.5", "Liver", "no size", "11 entries", "tumour -1 alone", "empty", "rows of 9", "reference"],
)
def test_bad_size_requests_exit_2_with_one_message_naming_the_path_and_write_nothing(
    size_config, tmp_path, capsys, sizes, generator, fragment
):
    generator = {key: str(make(tmp_path)) for key, make in generator.items()}
    assert main(["--config", str(size_config(sizes, **generator))]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    problems = [line for line in err.splitlines() if "$" in line]
    assert len(problems) == 1, err  # one clear message
    assert not (tmp_path / "out").exists()


def test_a_reference_without_a_requested_organ_is_named_with_the_file_and_the_entry(
    size_config, tmp_path, capsys
):
    reference = _reference_without_livers(tmp_path)
    config = size_config([["colon", -1], ["liver", 0.5]], size_reference=str(reference))
    assert main(["--config", str(config)]) == 2
    assert (
        f"$.anatomy.mask_generator.size_reference: {reference} has no volume of 'liver' "
        f"($.size_reference.liver is empty), but {WHERE}[1] gives it the size 0.5"
    ) in capsys.readouterr().err
    # the same reference serves a request that gives the liver no size
    assert (
        main(
            [
                "--config",
                str(size_config([["colon", -1], ["gallbladder", 0.2]], size_reference=str(reference))),
            ]
        )
        == 0
    )
