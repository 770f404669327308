"""Mask decoding with a per-tile argmax, and the channel -> MAISI id lookup."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock

from maisi.errors import InputError
from maisi.families.mask import get_mask_preset
from maisi.masks.decode import channel_to_id_table, channels_to_maisi_ids, decode_mask_labels
from maisi.masks.networks import build_mask_network
from maisi.vae.codec import TilingFallbackWarning
from maisi.vae.monai_adapter import check_structure
from maisi.vae.tiled import plan_tiles

TINY = get_mask_preset("tiny-mask-ddpm")
SCALE = 1.25


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mask_network(TINY, "autoencoder").eval()


def _latent(*shape: int) -> torch.Tensor:
    return torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(3))


def _untiled(vae: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.argmax(vae.decode(latent / SCALE), dim=1, keepdim=True)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "stored"])
@pytest.mark.parametrize(
    ("shape", "budget"), [((5, 7, 3), 1 << 18), ((6, 9, 5), 1 << 20), ((4, 4, 4), 1 << 30)]
)
def test_per_tile_argmax_equals_untiled_argmax_exactly(vae, shape, budget, stream):
    """Streamed: the upsampled levels (transposed upsampling, ResBlocks, GroupNorm, 125-channel
    convolution) run row by row with a statistics pass per GroupNorm; stored: each layer stored whole."""
    latent = _latent(*shape)
    labels = decode_mask_labels(vae, latent, SCALE, memory_budget_bytes=budget, stream_levels=stream)
    expected = _untiled(vae, latent)
    assert labels.shape == (1, 1, *(4 * s for s in shape)) and labels.dtype == torch.uint8
    assert torch.equal(labels.long(), expected)
    assert len(torch.unique(expected)) > 10  # a real test: many classes, not one constant label
    plans = plan_tiles(vae, tuple(latent.shape), memory_budget_bytes=budget, stream_levels=stream)
    assert plans[-1].channels == (8, 125)
    tiles = [-(-o // t) for o, t in zip(plans[-1].out_shape, plans[-1].tile)]
    if budget < 1 << 30:  # several tiles of the 125-channel output
        assert tiles[0] * tiles[1] * tiles[2] > 1
    if stream:  # the full-resolution layers really stream: several rows along x
        assert all(p.tile[0] < p.out_shape[0] for p in plans[-4:])


def test_ties_go_to_the_lowest_channel_as_torch_argmax(vae):
    """Equal logits in every channel (a VAE whose last convolution outputs its bias only): label 0."""
    flat = copy.deepcopy(vae)
    conv_out = flat.decoder.blocks[-1].conv.conv
    with torch.no_grad():
        conv_out.weight.zero_()
        conv_out.bias.fill_(0.5)
    labels = decode_mask_labels(flat, _latent(3, 3, 3), SCALE, memory_budget_bytes=1 << 18)
    assert torch.equal(labels, torch.zeros_like(labels))
    with torch.no_grad():
        conv_out.bias[7] = 1.0
        conv_out.bias[9] = 1.0  # tie between 7 and 9
    labels = decode_mask_labels(flat, _latent(3, 3, 3), SCALE, memory_budget_bytes=1 << 18)
    assert labels.unique().tolist() == [7]


def test_released_mask_vae_takes_the_tiled_path():
    torch.manual_seed(0)
    released = build_mask_network(get_mask_preset("maisi-mask-ddpm"), "autoencoder")
    assert check_structure(released, "decoder") is None


def test_unrecognised_vae_falls_back_to_monai_sliding_window_with_one_warning(vae):
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    odd = copy.deepcopy(vae)
    k = next(i for i, b in enumerate(odd.decoder.blocks) if type(b) is MaisiResBlock)
    odd.decoder.blocks[k] = Wrapped(odd.decoder.blocks[k])
    latent = _latent(4, 5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = decode_mask_labels(odd, latent, SCALE)  # the roi covers the latent: one window
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, TilingFallbackWarning)]
    assert len(fallbacks) == 1 and "sliding window" in fallbacks[0] and "(Wrapped)" in fallbacks[0]
    assert caught[0].filename == __file__
    assert torch.equal(labels.long(), _untiled(vae, latent))


def test_channels_map_to_maisi_ids():
    table = channel_to_id_table()
    assert table.shape == (125,)
    channels = torch.tensor([[0, 1, 2, 9], [121, 122, 123, 124]], dtype=torch.uint8)
    # background, liver, spleen (id 3), gallbladder (10); bone lesion 128, kidney mass 129, airway 132,
    # body 200
    expected = torch.tensor([[0, 1, 3, 10], [128, 129, 132, 200]], dtype=torch.int16)
    assert torch.equal(channels_to_maisi_ids(channels), expected)
    with pytest.raises(ValueError, match="channel index 125 outside 0..124"):
        channels_to_maisi_ids(torch.tensor([3, 125]))


def test_custom_table_file_is_checked(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"background": [0, 0], "liver": [1, 1], "tumour": [2, 26]}))
    assert channel_to_id_table(good).tolist() == [0, 1, 26]
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"background": [0, 0], "liver": [0, 1]}))
    with pytest.raises(InputError, match=f"{twice}: channel 0 is given twice \\('background', 'liver'\\)"):
        channel_to_id_table(twice)
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({"background": [0, 0], "liver": [2, 1]}))
    with pytest.raises(InputError, match=f"{gap}: channels \\[1\\] have no entry"):
        channel_to_id_table(gap)
