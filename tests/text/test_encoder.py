"""Text encoders: the tiny CLIP-style demo encoder (shapes, causality, strict round trip through a
weights_only checkpoint) and the transformers CLIPTextModel loader (local folders only, widths, SHA-256s,
SD-2.1's architecture on the meta device)."""

from __future__ import annotations

import pytest
import torch

from maisi.errors import InputError
from maisi.files import file_sha256
from maisi.text.encoder import SD21_TEXT_ENCODER, TextEncoder, TinyClipTextEncoder, load_clip_text_encoder
from maisi.text.tokenizer import END_TOKEN, START_TOKEN

IDS = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))


def tiny() -> TinyClipTextEncoder:
    torch.manual_seed(0)
    return TinyClipTextEncoder(width=32, layers=2, heads=4).eval()


def test_tiny_encoder_gives_n_77_width_and_is_causal():
    encoder = tiny()
    out = encoder(IDS)
    assert out.shape == (2, 77, 32) and torch.isfinite(out).all()
    changed = IDS.clone()
    changed[:, 40] = 1000
    out2 = encoder(changed)
    assert torch.equal(out[:, :40], out2[:, :40])  # tokens only see those before them, as in CLIP
    assert not torch.allclose(out[:, 40:], out2[:, 40:])
    with pytest.raises(ValueError, match=r"token ids must be \(N, 77\)"):
        encoder(IDS[:, :10])


def test_tiny_encoder_round_trips_strictly_through_a_weights_only_checkpoint(tmp_path):
    encoder = tiny()
    null = torch.tensor([START_TOKEN] + [END_TOKEN] * 76)
    torch.save({"text_encoder": encoder.record(null)}, tmp_path / "unet.pt")
    record = torch.load(tmp_path / "unet.pt", weights_only=True)["text_encoder"]
    loaded, null_tokens = TinyClipTextEncoder.from_record(record)
    assert loaded.architecture() == {"width": 32, "layers": 2, "heads": 4, "mlp_ratio": 4}
    assert torch.equal(null_tokens, null) and not loaded.training
    assert torch.equal(loaded(IDS), encoder(IDS))
    record["weights"].pop("final_norm.weight")
    with pytest.raises(InputError, match=r"missing \['final_norm.weight'\]"):
        TinyClipTextEncoder.from_record(record)
    with pytest.raises(InputError, match="lacks \\['null_tokens'\\]"):
        TinyClipTextEncoder.from_record({"architecture": {}, "weights": {}})


def test_tiny_encoder_encodes_prompts_and_the_null_prompt(clip_tokenizer):
    encoder = TinyClipTextEncoder(width=32, layers=1, heads=4, tokenizer=clip_tokenizer).eval()
    assert isinstance(encoder, TextEncoder)
    with torch.no_grad():
        context = encoder.encode(["a photo of a cat", "small left pleural effusion"])
        null = encoder.null_context("training")
    assert context.shape == (2, 77, 32) and null.shape == (1, 77, 32)
    assert not torch.allclose(context[0], context[1])
    expected = encoder(clip_tokenizer.null_tokens("training")[None])
    assert torch.equal(null, expected)


def tiny_clip_text_model(hidden_size: int = 32):
    transformers = pytest.importorskip("transformers", reason="the optional extra 'text' is not installed")
    config = transformers.CLIPTextConfig(
        **{
            **SD21_TEXT_ENCODER,
            "hidden_size": hidden_size,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    )
    torch.manual_seed(0)
    return transformers.CLIPTextModel(config).eval()


def test_a_local_clip_text_model_folder_loads_with_the_sha256_of_its_files(tmp_path, clip_tokenizer):
    model = tiny_clip_text_model()
    folder = tmp_path / "sd" / "text_encoder"
    model.save_pretrained(folder)
    for path in (folder, tmp_path / "sd"):  # the encoder's folder, or a pipeline folder holding it
        encoder = load_clip_text_encoder(path, expected_width=32, tokenizer=clip_tokenizer)
        assert isinstance(encoder, TextEncoder) and encoder.width == 32
        assert set(encoder.sha256) >= {"config.json", "model.safetensors"}
        assert encoder.sha256["model.safetensors"] == file_sha256(folder / "model.safetensors")
    with torch.no_grad():
        assert torch.allclose(encoder.encode_tokens(IDS), model(input_ids=IDS).last_hidden_state)
    assert encoder.encode(["a photo of a cat"]).shape == (1, 77, 32)
    assert encoder.null_context("empty_string").shape == (1, 77, 32)


def test_sd21s_key_layout_loads_and_a_missing_key_is_refused(tmp_path):
    """SD-2.1's text_encoder/model.safetensors names its keys "text_model.*" (transformers 4's layout)."""
    safetensors = pytest.importorskip("safetensors.torch")
    model = tiny_clip_text_model()
    model.save_pretrained(tmp_path)
    weights = safetensors.load_file(tmp_path / "model.safetensors")
    old_layout = {"text_model." + k.removeprefix("text_model."): v.contiguous() for k, v in weights.items()}
    safetensors.save_file(old_layout, tmp_path / "model.safetensors", metadata={"format": "pt"})
    encoder = load_clip_text_encoder(tmp_path, expected_width=32)
    with torch.no_grad():
        assert torch.allclose(encoder.encode_tokens(IDS), model(input_ids=IDS).last_hidden_state)
    old_layout.pop("text_model.final_layer_norm.weight")
    safetensors.save_file(old_layout, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        InputError, match="do not fit its config \\(missing keys: \\['final_layer_norm.weight'\\]"
    ):
        load_clip_text_encoder(tmp_path, expected_width=32)


def test_the_loader_refuses_hub_ids_missing_folders_and_the_wrong_width(tmp_path):
    with pytest.raises(InputError, match="Hugging Face Hub id.*left the Hub in November 2025"):
        load_clip_text_encoder("stabilityai/stable-diffusion-2-1")
    with pytest.raises(InputError, match="no such folder"):
        load_clip_text_encoder(tmp_path / "missing")
    with pytest.raises(InputError, match="no config.json"):
        load_clip_text_encoder(tmp_path)
    tiny_clip_text_model(hidden_size=32).save_pretrained(tmp_path / "enc")
    with pytest.raises(InputError, match="hidden_size 32, expected 1024"):
        load_clip_text_encoder(tmp_path / "enc")


def test_sd21_text_encoder_architecture_on_the_meta_device():
    transformers = pytest.importorskip("transformers", reason="the optional extra 'text' is not installed")
    with torch.device("meta"):
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD21_TEXT_ENCODER))
    names = {name for name, _ in model.named_parameters()}  # transformers 5 drops v4's "text_model." prefix
    assert "encoder.layers.22.mlp.fc2.weight" in names
    assert not any(".layers.23." in name for name in names)  # 23 layers
    assert model.get_input_embeddings().weight.shape == (49408, 1024)
    assert {layer.self_attn.num_heads for layer in model.encoder.layers} == {16}
    assert model.config.hidden_act == "gelu"
    assert sum(p.numel() for p in model.parameters()) == 340_387_840
