"""Classifier-free guidance and modality by name: the loop against stand-in networks, the tiny networks,
the checks of an infer config and a guided run end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import numpy as np
import pytest
import torch

from maisi import infer, sampling
from maisi.conditioning import Conditions, binarize_labels
from maisi.config import load_config
from maisi.data.io import Volume, read_mask, write_volume
from maisi.errors import InputError
from maisi.families.checks import _modality_problems
from maisi.families.ct import get_preset
from maisi.families.networks import build_network
from maisi.generation import plan as generation_plan
from maisi.labels import LabelDict, load_label_dict
from maisi.masks.tumour_free import lesion_hosts, remove_tumors, tumour_hosts
from maisi.options import Modality
from maisi.resources import load_json
from maisi.sampling import denoise, make_scheduler
from tests.conftest import phantom_mask, write_config

REPO = Path(__file__).resolve().parents[1]


def test_modality_names_are_the_mapping_names():
    assert get_args(Modality) == tuple(load_json("maisi_modality_mapping.json"))


class StandInControlNet(torch.nn.Module):
    """Mid residual = mean of the control + 0.01 x class label, per sample; records every call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, timesteps, controlnet_cond, conditioning_scale=1.0, class_labels=None):
        self.calls.append((controlnet_cond.clone(), class_labels.clone()))
        mid = controlnet_cond.mean(dim=(1, 2, 3, 4)) + 0.01 * class_labels.float()
        return [], mid.view(-1, 1, 1, 1, 1) * torch.ones_like(x)


class StandInUNet(torch.nn.Module):
    """Output = 0.3 x + 0.05 x class label + the ControlNet's mid residual; records every call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, timesteps, class_labels, spacing_tensor, mid_block_additional_residual=None, **_):
        self.calls.append((x.shape[0], class_labels.clone(), spacing_tensor.clone()))
        out = 0.3 * x + 0.05 * class_labels.float().view(-1, 1, 1, 1, 1)
        return out if mid_block_additional_residual is None else out + mid_block_additional_residual


def stand_in_output(x, labels, control):
    """What the stand-ins give for one half, computed by hand."""
    per_sample = 0.05 * labels.float() + control.mean(dim=(1, 2, 3, 4)) + 0.01 * labels.float()
    return 0.3 * x + per_sample.view(-1, 1, 1, 1, 1)


def rflow_scheduler():
    return make_scheduler(get_preset("tiny-rflow").schedule, "rflow")


@pytest.fixture
def step_inputs(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model output, latent) of every scheduler step the loop takes."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_step = sampling._step

    def recording_step(scheduler, output, t, next_t, x, generator, final):
        seen.append((output.clone(), x.clone()))
        return real_step(scheduler, output, t, next_t, x, generator, final)

    monkeypatch.setattr(sampling, "_step", recording_step)
    return seen


@pytest.mark.parametrize("scale", [0.5, 3.0, 15.0])
def test_guided_output_is_uncond_plus_s_times_cond_minus_uncond_in_one_call_per_step(scale, step_inputs):
    noise = torch.randn(2, 4, 4, 4, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([9, 10])
    spacing = torch.tensor([[150.0, 150.0, 200.0], [100.0, 100.0, 100.0]])
    control = torch.rand(2, 8, 16, 16, 8, generator=torch.Generator().manual_seed(1))
    uncond_control = torch.rand(2, 8, 16, 16, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    unet, controlnet, scheduler = StandInUNet(), StandInControlNet(), rflow_scheduler()
    steps = 4
    denoise(
        unet,
        scheduler,
        noise,
        steps,
        {"class_labels": labels, "spacing_tensor": spacing},
        controlnet=controlnet,
        control=control,
        guidance_scale=scale,
        uncond_control=uncond_control,
        progress=False,
    )
    assert len(unet.calls) == len(controlnet.calls) == len(step_inputs) == steps  # one call per step
    for batch, call_labels, call_spacing in unet.calls:
        assert batch == 4  # the doubled batch: conditional half, then unconditional half
        assert call_labels.tolist() == [9, 10, 0, 0]
        assert torch.equal(call_spacing, torch.cat((spacing, spacing)))
    for cond, call_labels in controlnet.calls:
        assert torch.equal(cond, torch.cat((control, uncond_control))) and call_labels.tolist() == [
            9,
            10,
            0,
            0,
        ]
    for output, x in step_inputs:
        assert x.shape == noise.shape  # the scheduler steps the undoubled latent
        cond = stand_in_output(x, labels, control)
        uncond = stand_in_output(x, torch.zeros_like(labels), uncond_control)
        torch.testing.assert_close(output, uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guidance_0_is_the_plain_loop_with_no_extra_work():
    noise = torch.randn(1, 4, 4, 4, 2, generator=torch.Generator().manual_seed(0))
    inputs = {"class_labels": torch.tensor([1]), "spacing_tensor": torch.tensor([[100.0, 100.0, 100.0]])}
    unet, controlnet = StandInUNet(), StandInControlNet()
    control = torch.rand(1, 8, 16, 16, 8)
    denoise(
        unet,
        rflow_scheduler(),
        noise,
        3,
        inputs,
        controlnet=controlnet,
        control=control,
        guidance_scale=0.0,
        uncond_control=torch.zeros_like(control),
        progress=False,
    )
    assert [c[0] for c in unet.calls] == [1, 1, 1] and all(c[1].tolist() == [1] for c in unet.calls)


@pytest.fixture(scope="module")
def tiny_rflow():
    preset = get_preset("tiny-rflow")
    torch.manual_seed(0)
    unet, controlnet = (
        build_network(preset, "diffusion_unet").eval(),
        build_network(preset, "controlnet").eval(),
    )
    for p in [*unet.parameters(), *controlnet.parameters()]:  # zero-initialised outputs would be trivial
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    inputs = Conditions((1.5, 1.5, 2.0), modality="ct").network_inputs(preset, 1, torch.device("cpu"))
    return preset, unet, controlnet, inputs


def _run_tiny(tiny_rflow, **kwargs):
    preset, unet, controlnet, inputs = tiny_rflow
    noise = torch.randn(1, 4, 8, 8, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.from_numpy(phantom_mask((32, 32, 16)).astype(np.int64))[None, None]
    return denoise(
        unet,
        make_scheduler(preset.schedule, "rflow"),
        noise,
        3,
        inputs,
        controlnet=controlnet,
        control=binarize_labels(labels),
        progress=False,
        **kwargs,
    )


def test_guidance_0_is_bit_identical_to_no_guidance_on_the_tiny_networks(tiny_rflow):
    plain = _run_tiny(tiny_rflow)
    uncond = torch.zeros(1, 8, 32, 32, 16)
    assert torch.equal(_run_tiny(tiny_rflow, guidance_scale=0.0, uncond_control=uncond), plain)
    # s = 1 is the conditional half alone: the doubled batch does not change it (up to rounding)
    torch.testing.assert_close(_run_tiny(tiny_rflow, guidance_scale=1.0, uncond_control=uncond), plain)
    guided = _run_tiny(tiny_rflow, guidance_scale=4.0, uncond_control=uncond)
    assert (guided - plain).abs().max() > 1e-3  # guidance acts


def test_guidance_without_class_labels_or_tumour_free_control_is_refused(tiny_rflow):
    with pytest.raises(ValueError, match="class_labels"):
        denoise(StandInUNet(), rflow_scheduler(), torch.zeros(1, 4, 4, 4, 2), 2, {}, guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond_control"):
        _run_tiny(tiny_rflow, guidance_scale=2.0)


def _tumour_mask_file(tmp_path):
    mask = phantom_mask()
    mask[6:10, 6:10, 3:6] = 26  # a hepatic tumour inside the liver block
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    return write_volume(tmp_path / "inputs" / "tumour_mask.nii.gz", Volume(mask, affine)), mask


def test_guided_run_feeds_the_tumour_free_mask_and_records_scale_and_modality(
    infer_config, tmp_path, monkeypatch, caplog
):
    path, mask = _tumour_mask_file(tmp_path)
    seen = {}
    original = generation_plan.denoise

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(generation_plan, "denoise", spy)
    config = infer_config(mask=str(path), sampling={"num_inference_steps": 2, "guidance_scale": 2.5})
    assert infer.main(["--config", str(config)]) == 0
    assert caplog.text.count("a checkpoint cannot tell whether it was") == 1  # warned once
    assert seen["guidance_scale"] == 2.5
    bits = 2 ** torch.arange(8).view(1, 8, 1, 1, 1)
    uncond_labels = (seen["uncond_control"] * bits).sum(dim=1)[0].long().numpy()
    assert np.array_equal(uncond_labels, np.where(mask == 26, 1, mask))  # tumour -> liver, rest as given
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["config"]["sampling"]["guidance_scale"] == 2.5
    assert meta["conditions"]["modality"] == "ct" and meta["conditions"]["modality_code"] == 1


def _label_dict_with_unhosted_tumour(tmp_path):
    labels = dict(load_json("maisi_label_dict.json"))
    del labels["dummy1"]
    labels["nsclc tumor"] = 2
    return str(write_config(tmp_path / "labels.json", labels))


GUIDED = {"num_inference_steps": 3, "guidance_scale": 2}
BAD = [
    ("modality misspelt", {"modality": "mri_t11"}, '$.modality: got "mri_t11"', "did you mean 'mri_t1'?"),
    (
        "modality for a preset without one",
        {"preset": "tiny-ddpm", "modality": "ct_contrast"},
        "$.modality: 'ct_contrast': preset 'tiny-ddpm' has no modality input",
        "leave $.modality at 'ct'",
    ),
    (
        "MR modality on a CT preset",
        {"modality": "mri_t1"},
        "$.modality: 'mri_t1' (code 9) is an MR modality, but preset 'tiny-rflow' generates CT",
        "use one of unknown, ct, ct_wo_contrast, ct_contrast",
    ),
    (
        "guidance on DDPM",
        {"preset": "tiny-ddpm", "sampling": GUIDED},
        "$.sampling.guidance_scale: 2: preset 'tiny-ddpm' has no modality input",
        "no unconditional branch",
    ),
    (
        "negative guidance",
        {"sampling": {"guidance_scale": -1}},
        "$.sampling.guidance_scale: got -1",
        "minimum",
    ),
    (
        "tumour class without a host",
        {"label_dict": "unhosted", "sampling": GUIDED},
        "$.label_dict: label dictionary: tumour-like class 'nsclc tumor' (id 2) has no host rule",
        "--host",
    ),
]


@pytest.mark.parametrize("flags", [(), ("--dry-run",)], ids=["run", "dry-run"])
@pytest.mark.parametrize(("changes", "where", "what"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_modality_and_guidance_exit_2_with_one_message_and_write_nothing(
    changes, where, what, flags, infer_config, tmp_path, capsys
):
    changes = dict(changes)
    if changes.get("label_dict") == "unhosted":
        changes["label_dict"] = _label_dict_with_unhosted_tumour(tmp_path)
    assert infer.main(["--config", str(infer_config(**changes)), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("maisi.infer: error:") and where in captured.err and what in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_an_mr_preset_refuses_ct_codes_and_takes_mr_and_unknown(infer_config):
    config = load_config(infer_config(modality="mri_t2"), "infer")
    mr = SimpleNamespace(name="some-mr", uses_modality=True, modality_family="mr")
    assert _modality_problems(config, mr) == []
    assert _modality_problems(dataclasses.replace(config, modality="unknown"), mr) == []
    (problem,) = _modality_problems(dataclasses.replace(config, modality="ct_contrast"), mr)
    assert problem.startswith("$.modality: 'ct_contrast' (code 3) is a CT modality, but preset 'some-mr'")
    assert "use one of unknown, mri, mri_t1" in problem


# ---------------------------------------------------------------- lesions' hosts as host rules (anatomy mode)

LUNGS = ["left lung upper lobe", "right lung upper lobe"]


def test_a_lesion_host_is_the_host_rule_of_its_class_and_joins_a_built_in_one():
    labels = load_label_dict(None)
    labels = LabelDict({**{k: v for k, v in labels.items() if k != "dummy1"}, "nsclc tumor": 2})
    mask = np.zeros((12, 12, 6), dtype=np.int16)
    mask[:6] = 28  # left lung upper lobe
    mask[6:] = 30  # right lung upper lobe
    mask[8:10, 3:5, 2:4] = 2  # the user's class, inside the right upper lobe
    mask[1:3, 3:5, 2:4] = 23  # a lung tumour inside the left upper lobe
    with pytest.raises(InputError, match="'nsclc tumor' \\(id 2\\) has no host rule.*lesions\\[i\\].host"):
        remove_tumors(mask, labels)
    placed = lesion_hosts([SimpleNamespace(label="nsclc tumor", host=("right lung upper lobe",))])
    assert tumour_hosts(labels, placed)[2] == (30,)
    free = remove_tumors(mask, labels, placed)
    assert np.array_equal(free[8:10, 3:5, 2:4], np.full((2, 2, 2), 30))  # -> the host it was placed in
    assert np.array_equal(free[1:3, 3:5, 2:4], np.full((2, 2, 2), 28))  # built-in vote: its own lobe
    # a lung-tumour lesion placed in one lobe adds to the lobe rule, it does not replace it
    lung = lesion_hosts([SimpleNamespace(label="lung tumor", host=("right lung upper lobe",))])
    assert set(tumour_hosts(labels, {**placed, **lung})[23]) == set(tumour_hosts(labels, placed)[23])
    assert np.array_equal(remove_tumors(mask, labels, {**placed, **lung}), free)
    # several lesions of a class: all their hosts; unknown names are left to the anatomy checks
    two = [
        SimpleNamespace(label="nsclc tumor", host=("right lung upper lobe",)),
        SimpleNamespace(label="nsclc tumor", host=("left lung upper lobe", "right lung upper lobe")),
        SimpleNamespace(label="nsclc tumour", host=("liver",)),
    ]
    assert lesion_hosts(two, labels) == {"nsclc tumor": ("right lung upper lobe", "left lung upper lobe")}


def test_guided_anatomy_run_with_a_lesion_of_an_unhosted_class_uses_its_host_for_the_tumour_free_mask(
    tmp_path, tiny_checkpoints, monkeypatch
):
    labels = json.loads(Path(_label_dict_with_unhosted_tumour(tmp_path)).read_text())
    assert "_hosts" not in labels  # no declared host: only the lesion says where the class lies
    seen = {}
    original = generation_plan.denoise

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(generation_plan, "denoise", spy)
    config = write_config(
        tmp_path / "anatomy.json",
        {
            "preset": "tiny-rflow",
            "checkpoints": {part: str(p) for part, p in tiny_checkpoints["tiny-rflow"].items()},
            "label_dict": str(tmp_path / "labels.json"),
            "anatomy": {
                "anatomy_list": LUNGS,
                "body_region": ["chest"],
                "mask_database": str(REPO / "maisi" / "resources" / "anatomy" / "database.json"),
                "augment": False,
                "lesions": [{"label": "nsclc tumor", "diameter_mm": 30, "host": "right lung upper lobe"}],
            },
            "output_size": [48, 48, 32],
            "spacing": [7.0, 7.0, 10.0],
            "sampling": {"num_inference_steps": 2, "guidance_scale": 2},
            "output": {"dir": str(tmp_path / "out")},
            "quality_check": {"max_tries": 1},
            "device": "cpu",
        },
    )
    assert infer.main(["--config", str(config)]) == 0
    label = read_mask(tmp_path / "out" / "sample_seed0_label.nii.gz").array
    assert (label == 2).any()  # the lesion was placed
    bits = 2 ** torch.arange(8).view(1, 8, 1, 1, 1)
    uncond_labels = (seen["uncond_control"] * bits).sum(dim=1)[0].long().numpy()
    assert np.array_equal(uncond_labels, np.where(label == 2, 30, label))  # lesion -> right upper lobe
    assert seen["guidance_scale"] == 2
    # the same request without the lesion is refused: the class is in the dictionary with no host rule
    data = json.loads(config.read_text())
    data["anatomy"]["lesions"] = []
    assert infer.main(["--config", str(write_config(config, data)), "--dry-run"]) == 2
