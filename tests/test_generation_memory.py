"""The mask stage's memory estimate (maisi.masks.memory): a lower bound of what the stage allocates, close to
the measured peak of the released preset, split between host and GPU as the stage places its arrays."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from maisi.families.mask import get_mask_preset
from maisi.masks import memory
from maisi.masks.networks import MaskNetworks, build_mask_network

MB = 1_000_000
# Measured on CPU (1 thread, a shared and loaded machine, torch 2.13): the peak RSS of one step over the RSS
# before it, random weights of maisi-mask-ddpm. Decode: tools/bench_mask_decode.py-style run of
# decode_mask_labels (streamed levels, 1 GiB budget); UNet: one forward on the 4 x 64^3 latent.
MEASURED_DECODE = {32: 833 * MB, 64: 1536 * MB}
MEASURED_UNET_FORWARD_64 = 1492 * MB


@pytest.fixture(scope="module")
def released_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mask_network(get_mask_preset("maisi-mask-ddpm"), "autoencoder").eval()


@pytest.mark.parametrize("latent", [32, 64])
def test_the_released_decode_estimate_is_below_its_measured_peak_and_close_to_it(released_vae, latent):
    storage, tile = memory.decode_bytes(released_vae, (4, latent, latent, latent), (4 * latent,) * 3, 125)
    assert 0.6 * MEASURED_DECODE[latent] < storage + tile <= MEASURED_DECODE[latent]
    # the streamed decode never holds the 125-channel logits (8.4 GB at 256^3), the fallback would
    assert storage + tile < 125 * 4 * (4 * latent) ** 3


def test_the_released_unets_attention_matrix_is_counted_on_cpu_only():
    preset = get_mask_preset("maisi-mask-ddpm")
    cpu = memory.attention_bytes(SimpleNamespace(preset=preset, device=torch.device("cpu")))
    # level 2 of the 64^3 latent: 16^3 tokens, 256 / 32 = 8 heads, float32, the scores and their softmax
    assert cpu == 2 * 4 * 8 * (16**3) ** 2
    assert 0.6 * MEASURED_UNET_FORWARD_64 < cpu <= MEASURED_UNET_FORWARD_64
    assert memory.attention_bytes(SimpleNamespace(preset=preset, device=torch.device("cuda"))) == 0  # flash


def _plan(device: str) -> SimpleNamespace:
    preset = get_mask_preset("tiny-mask-ddpm")
    torch.manual_seed(0)
    nets = MaskNetworks(
        build_mask_network(preset, "autoencoder").eval(), build_mask_network(preset, "diffusion_unet"), 1.0
    )
    return SimpleNamespace(preset=preset, networks=nets, device=torch.device(device))


def test_the_stage_puts_loop_and_tiles_on_the_gpu_and_the_stored_decode_on_the_host():
    cpu, cuda = memory.estimate_mask_memory(_plan("cpu")), memory.estimate_mask_memory(_plan("cuda"))
    p = cpu.parts
    assert p["weights"] == sum(
        t.numel() * 4
        for n in (_plan("cpu").networks.autoencoder, _plan("cpu").networks.diffusion_unet)
        for t in (*n.parameters(), *n.buffers())
    )
    assert p["latents"] == 4 * 4 * math.prod(get_mask_preset("tiny-mask-ddpm").latent_shape)
    assert p["decoded"] == 11 * 64**3
    peak = max(p["latents"] + p["attention"], p["decode_storage"] + p["decode_tile"], p["decoded"])
    assert cpu.host_bytes == p["weights"] + peak and cpu.device_bytes == 0
    q = cuda.parts
    assert q["attention"] == 0
    assert cuda.host_bytes == max(q["decode_storage"], q["decoded"])
    assert cuda.device_bytes == q["weights"] + max(q["latents"], q["decode_tile"])


def test_a_vae_the_tiled_decoder_does_not_know_is_counted_with_its_whole_logits(monkeypatch):
    plan = _plan("cpu")
    known = memory.estimate_mask_memory(plan).parts["decode_storage"]
    monkeypatch.setattr(memory, "check_structure", lambda module, part: "an unknown block")
    parts = memory.estimate_mask_memory(plan).parts
    assert parts["decode_storage"] == 125 * 4 * 64**3 + 64**3 > known
    assert parts["decode_tile"] == 0
