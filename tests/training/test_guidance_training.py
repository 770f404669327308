"""Training for guidance: modality dropout (diffusion), the region-contrastive loss (ControlNet)."""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms.utils_morphological_ops import dilate

from maisi.config import load_config
from maisi.data.io import read_mask, write_volume
from maisi.distributed import Ranks
from maisi.families.ct import get_preset
from maisi.train import main
from maisi.training.contrastive import contrast_regions, region_contrastive_terms
from maisi.training.diffusion import (
    MAISI_MODALITY_DROPOUT,
    ModalityDropoutDraw,
    drop_modality,
    modality_dropout_rates,
)
from maisi.training.latent_data import CaseDraw
from maisi.training.run import build_stage
from tests.conftest import write_config


@pytest.fixture
def train_config(latent_train_config):
    return partial(latent_train_config, steps=3, fold=0, checkpoint_every=3, validate_every=3, log_every=1)


# --- modality dropout ---------------------------------------------------------------------------------------


def _within_binomial(count: int, n: int, p: float) -> bool:
    """``count`` of ``n`` draws is within 5 standard deviations of ``n * p`` (exact when p is 0 or 1)."""
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize("parent, uncond", [(0.1, 0.1), (0.3, 0.05)])
def test_modality_dropout_rates_measured_over_many_draws(parent, uncond):
    n = 20_000
    start = {"ct_contrast": 3, "mri_t2": 10, "ct": 1, "mri": 8}
    codes = torch.tensor([c for c in start.values() for _ in range(n)])
    out = drop_modality(codes, parent, uncond, torch.Generator().manual_seed(0)).view(len(start), n)
    for row, (name, code) in zip(out, start.items()):
        parent_code = {3: 1, 10: 8}.get(code)
        zeroed = int((row == 0).sum())
        assert _within_binomial(zeroed, n, uncond), (name, zeroed)  # 0 whatever the code
        if parent_code is None:  # a parent code has no parent: it stays or becomes 0
            assert int((row == code).sum()) == n - zeroed, name
        else:  # to the parent unless then set to 0
            assert _within_binomial(int((row == parent_code).sum()), n, parent * (1 - uncond)), name
            assert _within_binomial(int((row == code).sum()), n, (1 - parent) * (1 - uncond)), name
            assert int((row == 0).sum() + (row == parent_code).sum() + (row == code).sum()) == n


def test_modality_codes_map_to_their_parents():
    codes = torch.arange(0, 34)
    always = drop_modality(codes, 1.0, 0.0, torch.Generator().manual_seed(0))
    expected = [0, 1, 1, 1, 1, 1, 1, 1, 8] + [8] * (34 - 9)  # CT 2-7 -> 1, MR >= 9 -> 8; 0, 1, 8 stay
    assert always.tolist() == expected
    assert drop_modality(codes, 0.0, 1.0, torch.Generator()).tolist() == [0] * 34
    assert codes.tolist() == list(range(34))  # the input is untouched


def test_zero_rates_disable_dropout_exactly(train_config):
    codes = torch.tensor([1, 3, 9, 10, 0, 8] * 50)
    generator = torch.Generator().manual_seed(7)
    before = generator.get_state()
    assert torch.equal(drop_modality(codes, 0.0, 0.0, generator), codes)
    assert torch.equal(generator.get_state(), before)  # nothing drawn: the rest of the step is unchanged
    off = load_config(
        train_config(diffusion={"modality_dropout": {"parent_rate": 0, "unconditional_rate": 0}}), "train"
    )
    stage = build_stage("diffusion", off, Ranks(), torch.device("cpu"))
    assert type(stage.batch_draw()) is CaseDraw  # the batches of a run without the option


def test_dropout_defaults_are_maisis_on_modality_presets_only(train_config):
    config = load_config(train_config(), "train")
    assert config.diffusion.modality_dropout.parent_rate is None
    assert (
        modality_dropout_rates(config, get_preset("tiny-rflow"))
        == (MAISI_MODALITY_DROPOUT,) * 2
        == (0.1, 0.1)
    )
    assert modality_dropout_rates(config, get_preset("tiny-ddpm")) == (0.0, 0.0)


def test_dropout_is_drawn_with_the_step_generator(train_config):
    config = load_config(
        train_config(diffusion={"modality_dropout": {"parent_rate": 0.5, "unconditional_rate": 0.5}}),
        "train",
    )
    stage = build_stage("diffusion", config, Ranks(), torch.device("cpu"))
    draw = stage.batch_draw()
    assert isinstance(draw, ModalityDropoutDraw) and (draw.parent_rate, draw.unconditional_rate) == (0.5, 0.5)
    runs = [
        [draw(torch.Generator().manual_seed(s))["unet_inputs"]["class_labels"].item() for s in range(40)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]  # a function of the generator alone: reproducible, and resumable by step
    assert set(runs[0]) == {0, 1}  # the sample cases are CT (1): kept or dropped to unknown (0)


# --- region-contrastive loss ----------------------------------------------------------------------------


def test_contrastive_loss_against_a_hand_computed_value():
    """1 x 1 x 4 x 4 x 4 latents, 16^3 labels, factor 4: a tumour at image voxels [4, 8)^3 covers latent
    voxel (1, 1, 1) (sampled at image voxel 4); grown by one voxel it spans [3, 9), so the background leaves
    out the latent voxels whose sampled image voxel (4 or 8 per axis) lies there: (1|2, 1|2, 1|2)."""
    labels = torch.ones(1, 1, 16, 16, 16, dtype=torch.long)  # liver
    labels[..., 4:8, 4:8, 4:8] = 26  # hepatic tumour
    free = torch.ones_like(labels)  # its tumour-free mask
    roi, background = contrast_regions(labels, free, 4)
    expected_roi = torch.zeros(1, 1, 4, 4, 4)
    expected_roi[0, 0, 1, 1, 1] = 1
    expected_background = torch.ones(1, 1, 4, 4, 4)
    expected_background[0, 0, 1:3, 1:3, 1:3] = 0
    assert torch.equal(roi, expected_roi) and torch.equal(background, expected_background)

    target = torch.zeros(1, 1, 4, 4, 4)
    output_free = torch.full((1, 1, 4, 4, 4), 0.5)  # L1 0.5 to the target...
    output_free[0, 0, 2, 2, 2] = 10.0  # ...but here, inside the grown region: left out of the background
    output = output_free.clone()
    output[0, 0, 1, 1, 1] += 1.5  # the two outputs differ by 1.5 inside the ROI
    output[0, 0, 2, 1, 1] += 7.0  # and outside it, which the foreground term ignores
    foreground, outside = region_contrastive_terms(output, output_free, target, roi, background, delta=2.0)
    assert foreground.item() == pytest.approx(-1.5 / (1 + 1e-5))  # -(1.5 over 1 voxel), above -delta
    assert outside.item() == pytest.approx(0.5 * 56 / (56 + 1e-5))  # 64 - 8 background voxels at 0.5
    output[0, 0, 1, 1, 1] += 3.0  # 4.5 apart: clipped at -delta
    clipped, _ = region_contrastive_terms(output, output_free, target, roi, background, delta=2.0)
    assert clipped.item() == pytest.approx(-2.0)
    weight = 0.01
    assert (weight * (clipped + outside)).item() == pytest.approx(0.01 * (-2.0 + 0.5), rel=1e-4)


def test_an_empty_region_contributes_nothing():
    labels = torch.ones(1, 1, 8, 8, 8, dtype=torch.long)
    roi, background = contrast_regions(labels, labels.clone(), 4)
    assert not roi.any() and bool(background.all())
    out = torch.randn(1, 4, 2, 2, 2)
    foreground, outside = region_contrastive_terms(out, out, torch.zeros_like(out), roi, background, 2.0)
    assert foreground.item() == 0.0 and outside.item() == pytest.approx(out.abs().mean().item(), rel=1e-4)


def test_regions_equal_maisis_dilation_and_nearest_resampling():
    """MAISI: ``dilate`` (MONAI, filter 3) at image resolution, then ``F.interpolate(mode="nearest")``."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 1, 24, 16, 32), generator=g)
    free = torch.where(torch.rand(labels.shape, generator=g) < 0.03, torch.zeros_like(labels), labels)
    roi, background = contrast_regions(labels, free, 4)
    changed = (labels != free).to(torch.uint8)
    size = (6, 4, 8)
    maisi_roi = F.interpolate(changed.float(), size=size, mode="nearest")
    maisi_bg = F.interpolate((1 - dilate(changed, filter_size=3)).float(), size=size, mode="nearest")
    assert roi.any() and torch.equal(roi, maisi_roi) and torch.equal(background, maisi_bg)


# --- the stages end to end ------------------------------------------------------------------------------


def _scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_diffusion_trains_with_modality_dropout(train_config, tmp_path, caplog):
    config = train_config(diffusion={"modality_dropout": {"parent_rate": 0.5, "unconditional_rate": 0.5}})
    assert main(["diffusion", "--config", str(config)]) == 0
    assert "modality dropout: parent code with p = 0.5, unknown (0) with p = 0.5" in caplog.text
    losses = _scalars(tmp_path / "run")["train/loss"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "run" / "diffusion_unet.pt").is_file()


def _datalist_with_a_tumour(encoded_cases: Path, tmp_path: Path) -> Path:
    """The latent datalist, each label with a block of its liver (1) turned into hepatic tumour (26)."""
    folder = tmp_path / "emb"
    shutil.copytree(encoded_cases.parent, folder)
    datalist = folder / "datalist.json"
    for entry in json.loads(datalist.read_text())["training"]:
        path = folder / entry["label"]
        mask = read_mask(path)
        liver = np.argwhere(mask.array == 1)
        x, y, z = liver[len(liver) // 2]  # a liver voxel well inside the liver
        array = mask.array.copy()
        block = array[x - 6 : x + 6, y - 6 : y + 6, z - 4 : z + 4]
        block[block == 1] = 26
        assert (array == 26).sum() > 100
        write_volume(path, mask.with_array(array))
    return datalist


def test_controlnet_trains_with_the_region_contrastive_loss(train_config, encoded_cases, tmp_path):
    datalist = _datalist_with_a_tumour(encoded_cases, tmp_path)
    controlnet = {"weighted_loss": 10.0, "weighted_loss_label": [26], "region_contrastive_weight": 0.01}
    config = train_config(datalist=str(datalist), controlnet=controlnet)
    assert main(["controlnet", "--config", str(config)]) == 0
    scalars = _scalars(tmp_path / "run")
    for term in ("loss", "l1", "contrastive_foreground", "contrastive_background"):
        values = scalars[f"train/{term}"]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), term
    foreground = scalars["train/contrastive_foreground"]
    # the ControlNet starts blind to its mask (MONAI zero-initialises its condition embedding's last layer
    # and its output convolutions), so both masks first give one output; as it learns, they part in the ROI
    assert all(-2.0 <= v <= 0 for v in foreground) and foreground[-1] < 0, foreground
    for total, l1, fg, bg in zip(
        *(scalars[f"train/{t}"] for t in ("loss", "l1", "contrastive_foreground", "contrastive_background"))
    ):
        assert total == pytest.approx(l1 + 0.01 * (fg + bg), rel=1e-5)
    assert math.isfinite(scalars["val/loss"][0])


def test_the_tumour_free_mask_is_made_in_the_batch_draw(train_config, encoded_cases, tmp_path):
    from maisi.masks.tumour_free import remove_tumors
    from maisi.training.controlnet import TUMOUR_FREE, TumourFreeDraw

    datalist = _datalist_with_a_tumour(encoded_cases, tmp_path)
    config = load_config(
        train_config(datalist=str(datalist), controlnet={"region_contrastive_weight": 0.01}), "train"
    )
    stage = build_stage("controlnet", config, Ranks(), torch.device("cpu"))
    draw = stage.batch_draw()
    assert isinstance(draw, TumourFreeDraw)
    batch = draw(torch.Generator().manual_seed(0))
    assert (batch["labels"] == 26).any() and not (batch[TUMOUR_FREE] == 26).any()
    assert torch.equal(batch[TUMOUR_FREE], remove_tumors(batch["labels"], stage.label_dict))
    changed = batch["labels"] != batch[TUMOUR_FREE]
    assert bool((batch[TUMOUR_FREE][changed] == 1).all())  # hepatic tumour -> liver

    # the loss sends both masks through the networks as one doubled batch: the terms of two separate passes
    from maisi.conditioning import binarize_labels
    from maisi.training.diffusion import add_training_noise

    torch.manual_seed(0)
    with torch.no_grad():  # a ControlNet that sees its mask (MONAI starts it blind: zero last layers)
        for p in stage.model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    on_device = stage.train.to_device(batch, torch.device("cpu"))
    on_device[TUMOUR_FREE] = batch[TUMOUR_FREE]
    with torch.no_grad():
        torch.manual_seed(1)
        terms, output, target = stage._loss(stage.model, on_device)
        torch.manual_seed(1)  # the same noise and timesteps
        noised = add_training_noise(stage.scheduler, on_device["latents"] * stage.scale_factor)
        inputs = on_device["unet_inputs"]
        real = stage._output(stage.model, noised, inputs, on_device["control"])
        free = stage._output(stage.model, noised, inputs, binarize_labels(batch[TUMOUR_FREE]))
    assert torch.equal(target, noised.target) and torch.allclose(output, real, atol=1e-5)
    roi, background = contrast_regions(batch["labels"], batch[TUMOUR_FREE], 4)
    foreground, outside = region_contrastive_terms(real, free, target, roi, background, 2.0)
    assert foreground.item() < 0 and roi.any()
    # float32 rounding of outputs of order 1 (batched or not), on a difference of order 1e-4
    assert terms["contrastive_foreground"].item() == pytest.approx(foreground.item(), abs=1e-6)
    assert terms["contrastive_background"].item() == pytest.approx(outside.item(), rel=1e-4)


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dropout on ddpm", "rate above 1", "rate below 0", "no host", "user class"])
def test_bad_guidance_training_input_exits_2(case, train_config, tmp_path, capsys):
    stage, changes = "diffusion", {}
    if case == "dropout on ddpm":
        changes = {"preset": "tiny-ddpm", "diffusion": {"modality_dropout": {"unconditional_rate": 0.1}}}
        fragment = (
            "$.diffusion.modality_dropout.unconditional_rate: 0.1, but preset 'tiny-ddpm' has no modality "
            "input"
        )
    elif case in ("rate above 1", "rate below 0"):
        value = 1.5 if case == "rate above 1" else -0.1
        changes = {"diffusion": {"modality_dropout": {"parent_rate": value}}}
        fragment = f"$.diffusion.modality_dropout.parent_rate: got {value}"
    elif case == "no host":  # liver is weighted, but is no tumour: the tumour-free mask keeps it
        stage = "controlnet"
        changes = {"controlnet": {"weighted_loss_label": [1], "region_contrastive_weight": 0.01}}
        fragment = "$.controlnet.weighted_loss_label: class 1 ('liver') has no host rule"
    else:  # the user's dictionary holds a tumour class without a host
        stage = "controlnet"
        from maisi.labels import load_label_dict

        label_dict = {("spleen cyst" if k == "dummy1" else k): v for k, v in load_label_dict().items()}
        path = write_config(tmp_path / "labels.json", label_dict)  # 'spleen cyst' in dummy1's slot (2)
        changes = {"controlnet": {"label_dict": str(path), "region_contrastive_weight": 0.01}}
        fragment = (
            "needed by $.controlnet.region_contrastive_weight: label dictionary: tumour-like class "
            "'spleen cyst' (id 2) has no host rule"
        )
    capsys.readouterr()
    assert main([stage, "--config", str(train_config(**changes))]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # nothing written
