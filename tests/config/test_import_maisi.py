"""``python -m maisi.config import-maisi`` on MAISI's own config files, and ``validate``.

The MAISI files below are copies of the released ones (NV-Generate-CTMR ``configs/config_infer.json``,
``configs/environment_rflow-ct.json``, ``environment_rflow-mr.json``,
``config_maisi_diff_model_rflow-mr*.json`` and ``environment_maisi_diff_model_rflow-mr*.json``; the
model-zoo bundle ``maisi_ct_generative`` ``configs/inference.json``, shortened to its inference settings
and a sample of its code keys).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maisi.config import load_schema
from maisi.config.__main__ import main
from maisi.config.import_maisi import Unresolved, resolve
from maisi.families.checks import load_checked_config

REPO = Path(__file__).resolve().parents[2]
PROG = "maisi.config import-maisi"

CONFIG_INFER = {  # NV-Generate-CTMR configs/config_infer.json
    "num_output_samples": 1,
    "body_region": ["chest"],
    "anatomy_list": ["lung tumor"],
    "controllable_anatomy_size": [],
    "controllable_demographics": None,
    "num_inference_steps": 30,
    "mask_generation_num_inference_steps": 100,
    "mask_generation_cfg_guidance_scale": 2.0,
    "output_size": [256, 256, 256],
    "image_output_ext": ".nii.gz",
    "label_output_ext": ".nii.gz",
    "spacing": [1.5, 1.5, 2.0],
    "autoencoder_sliding_window_infer_size": [48, 48, 48],
    "autoencoder_sliding_window_infer_overlap": 0.6666,
    "controlnet": "$@controlnet_def",
    "diffusion_unet": "$@diffusion_unet_def",
    "autoencoder": "$@autoencoder_def",
    "mask_generation_autoencoder": "$@mask_generation_autoencoder_def",
    "mask_generation_diffusion": "$@mask_generation_diffusion_def",
    "modality": 1,
    "cfg_guidance_scale": 0.0,
}
ENVIRONMENT = {  # NV-Generate-CTMR configs/environment_rflow-ct.json
    "output_dir": "output",
    "trained_autoencoder_path": "models/autoencoder_v1.pt",
    "trained_diffusion_path": "models/diff_unet_3d_rflow-ct.pt",
    "trained_controlnet_path": "models/controlnet_3d_rflow-ct.pt",
    "trained_mask_generation_autoencoder_path": "models/mask_generation_autoencoder.pt",
    "trained_mask_generation_diffusion_path": "models/mask_generation_diffusion_unet_v2.pt",
    "all_mask_files_base_dir": "datasets/all_masks_flexible_size_and_spacing_4000",
    "all_mask_files_json": "datasets/candidate_masks_flexible_size_and_spacing_4000.json",
    "all_anatomy_size_conditions_json": "datasets/all_anatomy_size_conditions.json",
    "label_dict_json": "./configs/label_dict.json",
    "label_dict_remap_json": "./configs/label_dict_124_to_132.json",
}
ENVIRONMENT_MR = {  # NV-Generate-CTMR configs/environment_rflow-mr.json
    "output_dir": "output",
    "trained_autoencoder_path": "models/autoencoder_v2.pt",
    "trained_diffusion_path": "models/diff_unet_3d_rflow-mr.pt",
    "trained_controlnet_path": None,
    "trained_mask_generation_autoencoder_path": "models/mask_generation_autoencoder.pt",
    "trained_mask_generation_diffusion_path": "models/mask_generation_diffusion_unet.pt",
    "all_mask_files_base_dir": None,
    "all_mask_files_json": None,
    "all_anatomy_size_conditions_json": None,
    "label_dict_json": "./configs/label_dict.json",
    "label_dict_remap_json": "./configs/label_dict_124_to_132.json",
}


def diff_model_config(dim, spacing, seed, modality, scale):  # configs/config_maisi_diff_model_*.json
    return {
        "diffusion_unet_train": {"batch_size": 1, "cache_rate": 0, "lr": 0.00001, "n_epochs": 1000},
        "diffusion_unet_inference": {
            "dim": dim,
            "spacing": spacing,
            "top_region_index": [0, 1, 0, 0],
            "bottom_region_index": [0, 0, 1, 0],
            "random_seed": seed,
            "num_inference_steps": 30,
            "modality": modality,
            "cfg_guidance_scale": scale,
        },
    }


def diff_model_environment(unet, autoencoder):  # configs/environment_maisi_diff_model_*.json
    return {
        "data_base_dir": "./data",
        "embedding_base_dir": "./embeddings",
        "json_data_list": "./dataset.json",
        "model_dir": "./models",
        "model_filename": unet,
        "output_dir": "./output",
        "output_prefix": "unet_3d",
        "trained_autoencoder_path": f"models/{autoencoder}",
        "existing_ckpt_filepath": f"./models/{unet}",
        "modality_mapping_path": "./configs/modality_mapping.json",
    }


BUNDLE = {  # model-zoo maisi_ct_generative configs/inference.json (its settings; code keys sampled)
    "imports": ["$import torch", "$from pathlib import Path", "$import scripts"],
    "bundle_root": ".",
    "model_dir": "$@bundle_root + '/models'",
    "output_dir": "$@bundle_root + '/output'",
    "create_output_dir": "$Path(@output_dir).mkdir(exist_ok=True)",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "trained_autoencoder_path": "$@model_dir + '/autoencoder_epoch273.pt'",
    "trained_diffusion_path": "$@model_dir + '/diff_unet_ckpt_epoch19350.pt'",
    "trained_controlnet_path": "$@model_dir + '/controlnet_current.pt'",
    "all_mask_files_base_dir": "$@bundle_root + '/datasets/all_masks_flexible_size_and_spacing_4000'",
    "all_mask_files_json": "$@bundle_root + '/configs/candidate_masks_flexible_size_and_spacing_4000.json'",
    "label_dict_json": "$@bundle_root + '/configs/label_dict.json'",
    "num_output_samples": 1,
    "body_region": [],
    "anatomy_list": ["hepatic tumor"],
    "modality": "ct",
    "controllable_anatomy_size": [],
    "num_inference_steps": 30,
    "mask_generation_num_inference_steps": 1000,
    "random_seed": 10,
    "spatial_dims": 3,
    "latent_channels": 4,
    "output_size_xy": 256,
    "output_size_z": 256,
    "output_size": ["@output_size_xy", "@output_size_xy", "@output_size_z"],
    "spacing_xy": 1.5,
    "spacing_z": 1.5,
    "spacing": ["@spacing_xy", "@spacing_xy", "@spacing_z"],
    "latent_shape": [
        "@latent_channels",
        "$@output_size[0]//4",
        "$@output_size[1]//4",
        "$@output_size[2]//4",
    ],
    "autoencoder_sliding_window_infer_size": [80, 80, 80],
    "autoencoder_sliding_window_infer_overlap": 0.4,
    "autoencoder": "$@autoencoder_def.to(@device)",
    "checkpoint_autoencoder": "$torch.load(@trained_autoencoder_path, weights_only=True)",
    "noise_scheduler": {
        "_target_": "scripts.rectified_flow.RFlowScheduler",
        "num_train_timesteps": 1000,
    },
    "run": [
        "$monai.utils.set_determinism(seed=@random_seed)",
        "$@ldm_sampler.sample_multiple_images(@num_output_samples)",
    ],
}
ANATOMY_IN_SCHEMA = "anatomy" in load_schema("infer")["properties"]


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def run(tmp_path: Path, config, *extra: str, name: str = "config_infer.json") -> tuple[int, Path]:
    source = write(tmp_path / "maisi" / name, config)
    output = tmp_path / "ours" / "infer.json"
    return main(["import-maisi", str(source), "--output", str(output), *extra]), output


def without_anatomy(config: dict, tmp_path: Path) -> Path:
    """The translated config minus anatomy: an image-only config today's loader checks in full."""
    return write(
        tmp_path / "ours" / "image_only.json",
        {k: v for k, v in config.items() if k != "anatomy"},
    )


# ---------------------------------------------------------------- MAISI's files


def test_config_infer_with_environment_translates_every_key(tmp_path, capsys):
    env = write(
        tmp_path / "NV-Generate-CTMR" / "configs" / "environment_rflow-ct.json",
        ENVIRONMENT,
    )
    root = env.parent.parent
    write(
        root / "configs" / "label_dict.json",
        (REPO / "maisi/resources/maisi_label_dict.json").read_text(),
    )
    code, output = run(tmp_path, CONFIG_INFER, "--environment", str(env), "--maisi-root", str(root))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "NOT translated" not in captured.err
    assert json.loads(output.read_text()) == {
        "preset": "maisi-ct-rflow",
        "checkpoints": {
            "autoencoder": "../NV-Generate-CTMR/models/autoencoder_v1.pt",
            "diffusion_unet": "../NV-Generate-CTMR/models/diff_unet_3d_rflow-ct.pt",
            "controlnet": "../NV-Generate-CTMR/models/controlnet_3d_rflow-ct.pt",
        },
        "anatomy": {
            "anatomy_list": ["lung tumor"],
            "body_region": ["chest"],
            "mask_database": "../NV-Generate-CTMR/datasets/"
            "candidate_masks_flexible_size_and_spacing_4000.json",
            "mask_root": "../NV-Generate-CTMR/datasets/all_masks_flexible_size_and_spacing_4000",
        },
        "output_size": [256, 256, 256],
        "spacing": [1.5, 1.5, 2.0],
        "modality": "ct",
        "sampling": {"num_inference_steps": 30},
        "decoding": {
            "method": "sliding_window",
            "sw_roi_size": [48, 48, 48],
            "sw_overlap": 0.6666,
        },
        "num_samples": 1,
        "output": {"format": "nii.gz", "dir": "../NV-Generate-CTMR/output"},
    }
    out = captured.out
    assert "num_output_samples -> $.num_samples = 1" in out
    assert (
        "label_dict_json: MAISI's label dictionary, which maisi ships" in out
    )  # same content: $.label_dict null
    assert "cfg_guidance_scale: 0: no classifier-free guidance" in out
    assert "preset maisi-ct-rflow: chosen from 'models/diff_unet_3d_rflow-ct.pt'" in out
    config = load_checked_config(without_anatomy(json.loads(output.read_text()), tmp_path), "infer")
    assert config.num_inference_steps == 30 and config.decoding.sw_roi_size == (
        48,
        48,
        48,
    )
    assert config.checkpoints.controlnet == str(root / "models" / "controlnet_3d_rflow-ct.pt")


def test_without_environment_points_at_the_downloaded_release(tmp_path, capsys):
    weights = tmp_path / "models" / "maisi"
    code, output = run(
        tmp_path,
        CONFIG_INFER,
        "--preset",
        "maisi-ct-ddpm",
        "--weights-dir",
        str(weights),
    )
    assert code == 0
    config = json.loads(output.read_text())
    assert config["preset"] == "maisi-ct-ddpm"
    assert config["checkpoints"] == {
        "autoencoder": "../models/maisi/autoencoder_v1.pt",
        "diffusion_unet": "../models/maisi/diff_unet_3d_ddpm-ct.pt",
        "controlnet": "../models/maisi/controlnet_3d_ddpm-ct.pt",
    }
    assert config["anatomy"]["mask_database"] == (
        "../models/maisi/datasets/candidate_masks_flexible_size_and_spacing_3000.json"
    )
    assert (
        config["anatomy"]["mask_root"] == "../models/maisi/datasets/all_masks_flexible_size_and_spacing_4000"
    )
    out = capsys.readouterr().out
    assert "--variant ddpm-ct" in out and "--with-mask-archive" in out
    assert "$.sampling.scheduler: ddim, for MAISI's 30 DDPM steps" in out
    assert config["sampling"]["scheduler"] == "ddim"  # DDPM at 30 steps is refused: MONAI's cannot stride


def test_bundle_inference_json_references_resolved_code_named(tmp_path, capsys):
    bundle = tmp_path / "maisi_ct_generative"
    label_dict = (REPO / "maisi/resources/maisi_label_dict.json").read_text()
    write(bundle / "configs" / "label_dict.json", label_dict)  # the bundle ships MAISI's
    code, output = run(tmp_path, BUNDLE, "--maisi-root", str(bundle), name="inference.json")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads(output.read_text())
    assert config["preset"] == "maisi-ct-rflow"  # from the bundle's RFlowScheduler
    assert config["output_size"] == [256, 256, 256] and config["spacing"] == [
        1.5,
        1.5,
        1.5,
    ]
    assert config["seed"] == 10 and config["modality"] == "ct"
    assert (
        config["checkpoints"]["diffusion_unet"]
        == "../maisi_ct_generative/models/diff_unet_ckpt_epoch19350.pt"
    )
    assert config["anatomy"]["mask_database"] == (
        "../maisi_ct_generative/configs/candidate_masks_flexible_size_and_spacing_4000.json"
    )
    assert config["anatomy"]["body_region"] == [] and config["anatomy"]["anatomy_list"] == ["hepatic tumor"]
    assert config["output"] == {"dir": "../maisi_ct_generative/output"}
    assert config["decoding"] == {
        "method": "sliding_window",
        "sw_roi_size": [80, 80, 80],
        "sw_overlap": 0.4,
    }
    assert "NOT translated" not in captured.err  # every code key is bundle machinery maisi does itself
    for key in (
        "imports",
        "create_output_dir",
        "device",
        "latent_shape",
        "checkpoint_autoencoder",
        "run",
    ):
        assert f"\n  {key}: " in captured.out, key
    load_checked_config(without_anatomy(config, tmp_path), "infer")


def test_untranslatable_keys_are_named_and_the_rest_is_written(tmp_path, capsys):
    maisi = {
        **CONFIG_INFER,
        "controllable_demographics": {"age": 60},
        "random_seed": None,
        "label_output_ext": ".nrrd",
        "modality": 5,
        "my_custom_flag": True,
        "num_inference_steps": "$@steps * 2",
    }
    code, output = run(tmp_path, maisi)
    assert code == 0
    err = capsys.readouterr().err
    expected = {
        "controllable_demographics": '{"age": 60}: demographic conditioning has no counterpart',
        "random_seed": "null (a new random seed every run) has no counterpart",
        "label_output_ext": "image and mask are written in one format here (nii.gz)",
        "modality": "5 has no name in MAISI's modality mapping",
        "my_custom_flag": "no counterpart in maisi.infer",
        "num_inference_steps": "the bundle expression '$@steps * 2' is code",
    }
    for key, why in expected.items():
        assert f"{PROG}: NOT translated: {key}: {why}" in err, key
    assert f"{len(expected)} key(s) NOT translated" in err
    config = json.loads(output.read_text())
    assert "seed" not in config and "modality" not in config and "sampling" not in config
    assert config["anatomy"]["anatomy_list"] == ["lung tumor"] and config["output"] == {"format": "nii.gz"}
    load_checked_config(without_anatomy(config, tmp_path), "infer")


def test_label_dict_that_cannot_be_read_is_named_and_left_to_maisi_s(tmp_path, capsys):
    env = write(tmp_path / "env.json", {"label_dict_json": "./configs/label_dict.json"})
    code, output = run(tmp_path, CONFIG_INFER, "--environment", str(env), "--maisi-root", str(tmp_path))
    assert code == 0
    err = capsys.readouterr().err
    assert (
        f"NOT translated: label_dict_json: {tmp_path / 'configs' / 'label_dict.json'} cannot be read" in err
    )
    assert "$.label_dict stays null" in err and "label_dict" not in json.loads(output.read_text())


def test_size_request_translates_to_mask_generation_with_its_files_and_guidance(tmp_path, capsys):
    env = write(tmp_path / "NV-Generate-CTMR" / "configs" / "environment_rflow-ct.json", ENVIRONMENT)
    root = env.parent.parent
    write(root / "configs" / "label_dict.json", (REPO / "maisi/resources/maisi_label_dict.json").read_text())
    sizes = [["hepatic tumor", 0.3], ["liver", 0.5]]
    maisi = {**CONFIG_INFER, "controllable_anatomy_size": sizes, "cfg_guidance_scale": 2.5}
    code, output = run(tmp_path, maisi, "--environment", str(env), "--maisi-root", str(root))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads(output.read_text())
    models, datasets = "../NV-Generate-CTMR/models/", "../NV-Generate-CTMR/datasets/"
    assert config["anatomy"] == {  # no anatomy_list, body_region or database: MAISI's Path A ignores them
        "controllable_anatomy_size": sizes,
        "mask_generator": {
            "num_inference_steps": 100,
            "scheduler": "ddim",
            "autoencoder": models + "mask_generation_autoencoder.pt",
            "diffusion_unet": models + "mask_generation_diffusion_unet_v2.pt",
            "size_conditions": datasets + "all_anatomy_size_conditions.json",
        },
    }
    assert config["sampling"] == {"num_inference_steps": 30, "guidance_scale": 2.5}
    assert config["checkpoints"]["controlnet"] == models + "controlnet_3d_rflow-ct.pt"
    out = captured.out
    assert "cfg_guidance_scale -> $.sampling.guidance_scale = 2.5" in out
    for key in ("anatomy_list", "body_region"):
        assert f"\n  {key}: MAISI ignores it when controllable_anatomy_size is given" in out, key
    for key in ("all_mask_files_json", "all_mask_files_base_dir"):
        assert f"\n  {key}: used by mask retrieval (MAISI's Path B) only" in out, key
    assert "NOT translated" not in captured.err
    loaded = load_checked_config(output, "infer")
    assert loaded.anatomy.controllable_anatomy_size == (("hepatic tumor", 0.3), ("liver", 0.5))
    assert loaded.anatomy.mask_generator.autoencoder == str(
        root / "models" / "mask_generation_autoencoder.pt"
    )
    assert loaded.sampling.guidance_scale == 2.5


def test_size_request_without_environment_points_at_the_released_mask_generator(tmp_path, capsys):
    sizes = [["liver", 0.8]]
    code, output = run(
        tmp_path, {**CONFIG_INFER, "controllable_anatomy_size": sizes}, "--weights-dir", str(tmp_path / "w")
    )
    assert code == 0
    anatomy = json.loads(output.read_text())["anatomy"]
    assert anatomy["mask_generator"] == {
        "num_inference_steps": 100,
        "scheduler": "ddim",
        "autoencoder": "../w/mask_generation_autoencoder.pt",
        "diffusion_unet": "../w/mask_generation_diffusion_unet.pt",
        "size_conditions": "../w/datasets/all_anatomy_size_conditions.json",
    }
    assert "mask_database" not in anatomy and "mask_root" not in anatomy
    assert "--variant rflow-ct" in capsys.readouterr().out


def test_guidance_on_the_ddpm_model_is_named_not_translated(tmp_path, capsys):
    code, output = run(tmp_path, {**CONFIG_INFER, "cfg_guidance_scale": 3.0}, "--preset", "maisi-ct-ddpm")
    assert code == 0
    err = capsys.readouterr().err
    assert "NOT translated: cfg_guidance_scale: 3.0: maisi guides only presets with a modality input" in err
    assert "guidance_scale" not in json.loads(output.read_text()).get("sampling", {})


def test_paired_config_with_the_mr_environment_becomes_an_image_only_mr_config(tmp_path, capsys):
    env = write(tmp_path / "NV-Generate-CTMR" / "configs" / "environment_rflow-mr.json", ENVIRONMENT_MR)
    root = env.parent.parent
    maisi = {**CONFIG_INFER, "modality": 9}
    code, output = run(tmp_path, maisi, "--environment", str(env), "--maisi-root", str(root))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads(output.read_text())
    assert config["preset"] == "maisi-mr-rflow" and config["modality"] == "mri_t1"
    assert config["checkpoints"] == {
        "autoencoder": "../NV-Generate-CTMR/models/autoencoder_v2.pt",
        "diffusion_unet": "../NV-Generate-CTMR/models/diff_unet_3d_rflow-mr.pt",
    }
    assert "anatomy" not in config and "label_dict" not in config
    assert config["output_size"] == [256, 256, 256] and config["spacing"] == [1.5, 1.5, 2.0]
    err, out = captured.err, captured.out
    for key, value in (("anatomy_list", '["lung tumor"]'), ("body_region", '["chest"]')):
        assert f"NOT translated: {key}: {value}: MAISI released no MR ControlNet" in err, key
    assert "2 key(s) NOT translated (anatomy_list, body_region)" in err
    assert "\n  trained_controlnet_path: null: nothing asked of a mask" in out
    assert (
        "\n  trained_mask_generation_autoencoder_path: the translated config generates an image only" in out
    )
    assert "MAISI samples rflow-mr with cfg_guidance_scale 15" in out  # config_infer's 0 was kept
    loaded = load_checked_config(output, "infer")
    assert not loaded.from_anatomy and loaded.preset == "maisi-mr-rflow"


@pytest.mark.parametrize(
    ("variant", "maisi", "env", "shipped"),
    [
        (
            "rflow-mr",
            diff_model_config([128, 256, 256], [1.25, 1.0, 1.0], 0, 9, 15),
            diff_model_environment("diff_unet_3d_rflow-mr.pt", "autoencoder_v2.pt"),
            "inference_maisi_rflow_mr.json",
        ),
        (
            "rflow-mr-brain",
            diff_model_config([256, 256, 128], [0.94, 0.94, 1.36], 1234, 9, 2),
            diff_model_environment("diff_unet_3d_rflow-mr-brain_v1.pt", "autoencoder_v1.pt"),
            "inference_maisi_rflow_mr_brain.json",
        ),
    ],
    ids=["rflow-mr", "rflow-mr-brain"],
)
def test_maisi_s_image_only_mr_configs_translate_to_the_shipped_mr_configs(
    tmp_path, capsys, variant, maisi, env, shipped
):
    root = tmp_path / "NV-Generate-CTMR"
    env_file = write(root / "configs" / f"environment_maisi_diff_model_{variant}.json", env)
    code, output = run(
        tmp_path,
        maisi,
        "--environment",
        str(env_file),
        "--maisi-root",
        str(root),
        name=f"config_maisi_diff_model_{variant}.json",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "NOT translated" not in captured.err
    config = json.loads(output.read_text())
    assert config["checkpoints"] == {
        "autoencoder": f"../NV-Generate-CTMR/models/{env['trained_autoencoder_path'].split('/')[-1]}",
        "diffusion_unet": f"../NV-Generate-CTMR/models/{env['model_filename']}",
    }
    assert config["output"] == {"prefix": "unet_3d", "dir": "../NV-Generate-CTMR/output"}
    # MAISI's per-variant settings are what the shipped config of that variant holds
    ours = json.loads((REPO / "configs" / shipped).read_text())
    for key in ("preset", "output_size", "spacing", "modality", "seed"):
        assert config[key] == ours[key], key
    for key in ("num_inference_steps", "guidance_scale"):
        assert config["sampling"][key] == ours["sampling"][key], key
    out = captured.out
    assert "diffusion_unet_inference.cfg_guidance_scale -> $.sampling.guidance_scale" in out
    assert "\n  diffusion_unet_inference.top_region_index: rectified-flow presets take no body region" in out
    assert "\n  diffusion_unet_train: a training setting" in out
    load_checked_config(output, "infer")


def test_ddpm_image_only_config_takes_its_body_region_from_the_one_hot_vectors(tmp_path, capsys):
    maisi = diff_model_config([256, 256, 256], [1.5, 1.5, 2.0], 0, 1, 0)
    env = write(tmp_path / "env.json", diff_model_environment("diff_unet_3d_ddpm-ct.pt", "autoencoder_v1.pt"))
    code, output = run(tmp_path, maisi, "--environment", str(env), "--maisi-root", str(tmp_path))
    assert code == 0, capsys.readouterr().err
    config = json.loads(output.read_text())
    assert config["preset"] == "maisi-ct-ddpm" and config["modality"] == "ct"
    assert config["body_region"] == {"top": "chest", "bottom": "abdomen"}
    assert "controlnet" not in config["checkpoints"] and "anatomy" not in config
    assert load_checked_config(output, "infer").body_region.top == "chest"


@pytest.mark.skipif(
    not ANATOMY_IN_SCHEMA,
    reason="the infer schema has no 'anatomy' key yet (anatomy mode)",
)
def test_translation_loads_whole_once_the_schema_has_anatomy(tmp_path):
    code, output = run(tmp_path, CONFIG_INFER, "--weights-dir", str(tmp_path / "w"))
    assert code == 0
    config = load_checked_config(output, "infer")
    assert config.anatomy.anatomy_list == ("lung tumor",) and config.anatomy.body_region == ("chest",)


# ---------------------------------------------------------------- bad input: exit 2, nothing written


def _as_ours(tmp_path: Path) -> dict:
    return json.loads((REPO / "configs" / "inference_maisi_rflow_ct.json").read_text())


BAD = [
    (
        "not json",
        '{"output_size": [256, 256,',
        "not valid JSON: Expecting value at line 1",
    ),
    ("a list", [CONFIG_INFER], "not a MAISI inference config: expected a JSON object"),
    (
        "ours",
        "OURS",
        "is a maisi config already ($.preset / $.checkpoints); check it with: python -m maisi.config",
    ),
    (
        "no maisi key",
        {"learning_rate": 1e-4},
        "not a MAISI inference config: it has none of MAISI's inference keys",
    ),
    (
        "output_size is code",
        {**CONFIG_INFER, "output_size": "$[@x] * 3"},
        "$.output_size holds the bundle expression '$[@x] * 3'; maisi does not evaluate code in configs",
    ),
    (
        "spacing missing",
        {k: v for k, v in CONFIG_INFER.items() if k != "spacing"},
        "$.spacing is missing",
    ),
    (
        "MR without its variant",
        {**CONFIG_INFER, "modality": 9},
        "$.modality is 9 (MR), but nothing names which of MAISI's MR models to use",
    ),
    (
        "MR weights, CT code",
        {**CONFIG_INFER, "trained_diffusion_path": "models/diff_unet_3d_rflow-mr.pt"},
        "$.modality is 1 (ct, a CT modality), but the translation uses MAISI's MR model rflow-mr",
    ),
    (
        "CT weights, MR code",
        {**CONFIG_INFER, "modality": 10, "trained_diffusion_path": "models/diff_unet_3d_rflow-ct.pt"},
        "$.modality is 10 (mri_t2, an MR modality), but the translation uses MAISI's CT model rflow-ct",
    ),
    (
        "two tumours in the size request",
        {**CONFIG_INFER, "controllable_anatomy_size": [["hepatic tumor", 0.3], ["lung tumor", 0.5]]},
        "a second tumour 'lung tumor' (entry 0 is 'hepatic tumor'); MAISI's mask generation takes at most "
        "one tumour (from MAISI's controllable_anatomy_size)",
    ),
    (
        "MR grid",
        {**CONFIG_INFER, "modality": 9, "output_size": [256, 256, 512], "trained_diffusion_path": "rflow-mr"},
        "size z 512 is not one of [128, 256] (preset 'maisi-mr-rflow' limits; $.enforce_preset_limits false "
        "relaxes them) (from MAISI's output_size)",
    ),
    (
        "region",
        {**CONFIG_INFER, "body_region": ["chestt"]},
        "unknown region 'chestt' (did you mean 'chest'?)",
    ),
    (
        "anatomy",
        {**CONFIG_INFER, "anatomy_list": ["lung tumour"]},
        "$.anatomy_list: 'lung tumour' (did you mean 'lung tumor'?) not in the label dictionary",
    ),
    (
        "refused by our schema",
        {**CONFIG_INFER, "num_output_samples": 0, "output_size": [256, 256]},
        "$.num_samples: got 0: 0 is less than the minimum of 1 (from MAISI's num_output_samples)",
    ),
]


@pytest.mark.parametrize("case, maisi, says", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exit_2_one_message_nothing_written(tmp_path, capsys, case, maisi, says):
    if maisi == "OURS":
        maisi = _as_ours(tmp_path)
    code, output = run(tmp_path, maisi)
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and "Traceback" not in err
    assert str(tmp_path / "maisi" / "config_infer.json") in err or str(output) in err  # names the file
    assert not (tmp_path / "ours").exists()  # nothing written, not even the folder


def test_schema_refusal_lists_every_problem_with_its_maisi_key(tmp_path, capsys):
    code, _ = run(tmp_path, {**CONFIG_INFER, "num_output_samples": 0, "output_size": [256, 256]})
    err = capsys.readouterr().err
    assert code == 2 and "(2 problem(s))" in err
    assert "$.output_size: got [256, 256]" in err and "(from MAISI's output_size)" in err


def test_output_that_is_an_input_or_a_folder_is_refused(tmp_path, capsys):
    source = write(tmp_path / "config_infer.json", CONFIG_INFER)
    before = source.read_text()
    assert main(["import-maisi", str(source), "--output", str(source)]) == 2
    assert f"--output {source} would overwrite FILE {source}" in capsys.readouterr().err
    assert source.read_text() == before
    assert main(["import-maisi", str(source), "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err
    blocker = write(tmp_path / "blocker", "")
    assert main(["import-maisi", str(source), "--output", str(blocker / "x.json")]) == 2
    assert f"--output folder {blocker} is a file, not a folder" in capsys.readouterr().err


def test_environment_that_is_not_an_object_is_refused(tmp_path, capsys):
    env = write(tmp_path / "env.json", "[1, 2]")
    code, _ = run(tmp_path, CONFIG_INFER, "--environment", str(env))
    assert code == 2
    assert (
        f"{env}: not a MAISI inference config: expected a JSON object (a MAISI environment"
        in capsys.readouterr().err
    )


# ---------------------------------------------------------------- the pieces


def test_resolve_follows_references_and_joins_but_runs_no_code():
    data = {
        "root": ".",
        "models": "$@root + '/models'",
        "xy": 256,
        "size": ["@xy", "@xy", 128],
        "a": "@b",
        "b": "@a",
    }
    assert resolve('$@models + "/vae.pt"', data) == "./models/vae.pt"
    assert resolve(data["size"], data) == [256, 256, 128]
    for expression in (
        "@a",
        "@missing",
        "$@xy + '/x'",
        "$torch.device('cpu')",
        "%configs/x.json#key",
    ):
        with pytest.raises(Unresolved):
            resolve(expression, data)


def test_the_translation_and_its_cli_import_no_torch_numpy_or_monai():
    code = (
        "import sys, maisi.config, maisi.config.import_maisi, maisi.config.__main__\n"
        "print(sorted(m for m in ('torch', 'numpy', 'monai') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- validate


def test_validate_accepts_a_shipped_config_and_names_every_problem(tmp_path, capsys):
    shipped = REPO / "configs" / "inference_maisi_rflow_ct.json"
    assert main(["validate", str(shipped), "--kind", "infer"]) == 0
    assert f"{shipped}: a valid infer config" in capsys.readouterr().out
    broken = write(
        tmp_path / "broken.json",
        {**_as_ours(tmp_path), "num_samples": 0, "sampling": {"steps": 3}},
    )
    assert main(["validate", str(broken), "--kind", "infer"]) == 2
    err = capsys.readouterr().err
    assert "$.num_samples: got 0" in err and "$.sampling.steps: unknown key 'steps'" in err
    assert main(["validate", str(tmp_path / "missing.json"), "--kind", "train"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_the_channel_map_of_a_size_request_must_be_maisis(tmp_path, capsys):
    env = write(tmp_path / "NV-Generate-CTMR" / "configs" / "environment_rflow-ct.json", ENVIRONMENT)
    root = env.parent.parent
    maisi_map = json.loads((REPO / "maisi/resources/maisi_label_dict_124_to_132.json").read_text())
    remap = write(root / "configs" / "label_dict_124_to_132.json", maisi_map)
    maisi = {**CONFIG_INFER, "controllable_anatomy_size": [["liver", 0.5]]}
    code, _ = run(tmp_path, maisi, "--environment", str(env), "--maisi-root", str(root))
    captured = capsys.readouterr()
    assert code == 0 and "label_dict_remap_json: MAISI's channel -> id map, which maisi ships" in captured.out
    assert "label_dict_remap_json" not in captured.err
    # another model's channels (liver and spleen swapped): decoding with MAISI's map would mislabel them
    write(remap, {**maisi_map, "liver": [3, 1], "spleen": [1, 3]})
    code, output = run(tmp_path, maisi, "--environment", str(env), "--maisi-root", str(root))
    assert code == 0 and output.is_file()
    assert (
        f"NOT translated: label_dict_remap_json: {remap} differs from MAISI's channel -> id map"
        in capsys.readouterr().err
    )
