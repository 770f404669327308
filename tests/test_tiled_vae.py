"""Tiled VAE decoding/encoding equals MONAI's whole-volume pass, within a measured memory bound; the
adapter that reads MONAI's structure matches MONAI's forward, and a model it does not know falls back with a
warning."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiResBlock
from monai.networks.blocks import Convolution

from maisi.families.ct import PRESETS, get_preset
from maisi.families.networks import build_network
from maisi.vae.codec import TilingFallbackWarning, decode, encode
from maisi.vae.monai_adapter import Step, check_structure, program
from maisi.vae.tiled import TilingTrace, UnsupportedStructure, decode_tiled, encode_tiled, plan_tiles

TOL = 1e-4  # float32: only the summation order differs from the whole-volume pass


def _vae(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(get_preset(name), "autoencoder").eval()


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return _vae("tiny-rflow")


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    return _vae("small-rflow")


def _latent(*shape: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, *shape, generator=torch.Generator().manual_seed(seed))


def _image(*shape: int, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(2))


def _splits_unevenly(trace: TilingTrace, vae: torch.nn.Module, shape: tuple, part: str = "decoder") -> bool:
    """Whether some step's tile does not divide its volume (so edge tiles are smaller)."""
    outs = [p.out_shape for p in plan_tiles(vae, shape, part=part, max_tile_voxels=1 << 40)]  # type: ignore[arg-type]
    return any(o % t for (_, tile, _), out in zip(trace.steps, outs) for o, t in zip(out, tile))


@pytest.mark.parametrize(
    ("shape", "limit"),
    [
        ((5, 7, 3), {"max_tile_voxels": 7}),
        ((6, 4, 9), {"max_tile_voxels": 7}),
        ((5, 7, 3), {"max_tile_voxels": 100}),
        ((8, 8, 8), {"max_tile_voxels": 100}),
        ((6, 4, 9), {"memory_budget_bytes": 1 << 19}),
        ((8, 8, 8), {"memory_budget_bytes": 1 << 19}),
        ((5, 7, 3), {"memory_budget_bytes": 1 << 30}),
    ],
)
def test_tiled_decode_equals_untiled(tiny, shape, limit):
    z = _latent(*shape)
    with torch.no_grad():
        expected = tiny.decode_stage_2_outputs(z)
    trace = TilingTrace()
    got = decode_tiled(tiny, z, trace=trace, **limit)
    assert got.shape == expected.shape == (1, 1, *(4 * s for s in shape))
    assert (got - expected).abs().max().item() <= TOL
    assert trace.num_tiles > 20
    if limit.get("max_tile_voxels") == 7:
        assert _splits_unevenly(trace, tiny, z.shape)


def test_tiled_decode_handles_a_batch_with_per_sample_statistics(tiny):
    z = torch.cat([_latent(4, 6, 5, seed=3), 3 * _latent(4, 6, 5, seed=4) + 1])  # very different statistics
    with torch.no_grad():
        expected = torch.cat([tiny.decode_stage_2_outputs(z[i : i + 1]) for i in range(2)])
    assert (decode_tiled(tiny, z, max_tile_voxels=40) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("shape", [(20, 28, 12), (16, 16, 16), (12, 8, 36)])
@pytest.mark.parametrize(
    "limit", [{"max_tile_voxels": 30}, {"max_tile_voxels": 500}, {"memory_budget_bytes": 1 << 20}]
)
def test_tiled_encode_equals_untiled(tiny, shape, limit):
    x = _image(*shape)
    with torch.no_grad():
        mu, sigma = tiny.encode(x)
    trace = TilingTrace()
    got_mu, got_sigma = encode_tiled(tiny, x, trace=trace, **limit)
    assert got_mu.shape == mu.shape == (1, 4, *(s // 4 for s in shape))
    assert (got_mu - mu).abs().max().item() <= TOL
    assert (got_sigma - sigma).abs().max().item() <= TOL
    if limit.get("max_tile_voxels") == 30:
        assert _splits_unevenly(trace, tiny, x.shape, "encoder")


def _full_resolution_bytes(vae: torch.nn.Module, shape: tuple) -> int:
    """Bytes of the largest whole volume (float32) among the layers from the last upsampling on."""
    plans = plan_tiles(vae, shape)
    start = max(i for i, p in enumerate(plans) if p.in_shape != p.out_shape)
    return max(
        4 * shape[0] * p.channels[1] * p.out_shape[0] * p.out_shape[1] * p.out_shape[2] for p in plans[start:]
    )


@pytest.mark.parametrize("budget", [1 << 20, 1 << 22])
def test_streamed_levels_equal_untiled_and_hold_rows_not_volumes(tiny, budget):
    """The upsampled levels run interleaved along x, one statistics pass per GroupNorm, and hold a few rows:
    less than one full-resolution volume stored whole, while the stored path holds several."""
    z = _latent(16, 6, 5)
    with torch.no_grad():
        expected = tiny.decode_stage_2_outputs(z)
    streamed, stored = TilingTrace(), TilingTrace()
    got = decode_tiled(tiny, z, memory_budget_bytes=budget, stream_levels=True, trace=streamed)
    assert (got - expected).abs().max().item() <= TOL
    decode_tiled(tiny, z, memory_budget_bytes=budget, trace=stored)
    volume = _full_resolution_bytes(tiny, tuple(z.shape))  # 16 channels x 64 x 24 x 20
    assert streamed.max_stored_bytes < volume < stored.max_stored_bytes
    assert 0 < streamed.max_tile_bytes <= budget
    # the last level (upsample, ResBlock conv1 and conv2, conv_out after a GroupNorm): passes for the
    # statistics of conv1's, conv2's and conv_out's input, then the result; the one before it likewise
    names = [name for name, _, _ in streamed.steps]
    assert [names.count(f"decoder.blocks.{b}") for b in ("2", "3.conv1", "3.conv2")] == [3, 2, 1]
    assert [names.count(f"decoder.blocks.{b}") for b in (4, 7)] == [4, 1]
    assert [names.count(f"decoder.blocks.5.conv{i}") for i in (1, 2)] == [3, 2]
    plans = plan_tiles(tiny, tuple(z.shape), memory_budget_bytes=budget, stream_levels=True)
    assert [(n, t) for n, t, _ in streamed.steps[-4:]] == [(p.name, p.tile) for p in plans[-4:]]
    assert all(p.tile[0] < p.out_shape[0] for p in plans[-4:])  # several rows: the streaming is real


def test_streamed_levels_refuse_a_budget_below_their_rows(tiny):
    decode_tiled(tiny, _latent(4, 4, 4), memory_budget_bytes=50_000)  # stored: small tiles fit
    with pytest.raises(ValueError, match="below the rows the streamed layers hold"):
        decode_tiled(tiny, _latent(4, 4, 4), memory_budget_bytes=50_000, stream_levels=True)


@pytest.mark.parametrize("stream_levels", [False, True])
def test_transposed_upsampling_in_tiles_of_one_voxel(stream_levels):
    """Per-phase transposed convolutions: tiles too thin to hold every output phase, odd sizes, MONAI's
    output padding at the far border."""
    kwargs = {
        **get_preset("tiny-rflow").autoencoder,
        "num_splits": 1,
        "dim_split": 0,
        "use_convtranspose": True,
    }
    torch.manual_seed(0)
    vae = AutoencoderKlMaisi(**kwargs).eval()
    z = _latent(3, 5, 2)
    with torch.no_grad():
        expected = vae.decode_stage_2_outputs(z)
    trace = TilingTrace()
    got = decode_tiled(vae, z, max_tile_voxels=7, stream_levels=stream_levels, trace=trace)
    assert (got - expected).abs().max().item() <= TOL
    assert any(name.endswith("blocks.4") and 1 in tile for name, tile, _ in trace.steps)


def test_small_preset_decode_and_encode(small):
    z = _latent(6, 5, 7)
    with torch.no_grad():
        expected = small.decode_stage_2_outputs(z)
        mu, _ = small.encode(expected.clamp(0, 1))
    trace = TilingTrace()
    assert (
        decode_tiled(small, z, memory_budget_bytes=1 << 21, trace=trace) - expected
    ).abs().max().item() <= TOL
    assert trace.num_tiles > 30
    got_mu, _ = encode_tiled(small, expected.clamp(0, 1), memory_budget_bytes=1 << 21)
    assert (got_mu - mu).abs().max().item() <= TOL


def test_released_architecture_smoke():
    vae = _vae("maisi-ct-rflow")  # num_splits 4 along y: MONAI's own pass needs y >= 12 latent voxels
    z = _latent(8, 12, 8)
    with torch.no_grad():
        expected = vae.decode_stage_2_outputs(z)
    got = decode_tiled(vae, z, memory_budget_bytes=16 << 20)
    assert (got - expected).abs().max().item() <= TOL
    with torch.no_grad():
        mu, _ = vae.encode(expected.clamp(0, 1))
    assert (
        encode_tiled(vae, expected.clamp(0, 1), memory_budget_bytes=16 << 20)[0] - mu
    ).abs().max().item() <= TOL


@pytest.mark.parametrize("budget", [1 << 18, 1 << 20, 1 << 22])
def test_memory_budget_is_respected(small, budget):
    z = _latent(8, 8, 8)
    plans = plan_tiles(small, tuple(z.shape), memory_budget_bytes=budget)  # type: ignore[arg-type]
    assert all(p.tile_bytes <= budget for p in plans)
    trace = TilingTrace()
    decode_tiled(small, z, memory_budget_bytes=budget, trace=trace)
    assert 0 < trace.max_tile_bytes <= budget  # measured on the tile tensors actually processed
    assert [(name, tile) for name, tile, _ in trace.steps] == [(p.name, p.tile) for p in plans]


def test_smaller_budgets_give_smaller_tiles(small):
    shape = (1, 4, 16, 16, 16)
    tiles = [
        sum(p.tile[0] * p.tile[1] * p.tile[2] for p in plan_tiles(small, shape, memory_budget_bytes=b))
        for b in (1 << 18, 1 << 21, 1 << 24)
    ]
    assert tiles[0] < tiles[1] < tiles[2]


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from maisi.families.ct import get_preset
    from maisi.families.networks import build_network
    from maisi.vae.tiled import decode_tiled
    torch.manual_seed(0)
    vae = build_network(get_preset("small-rflow"), "autoencoder").eval()
    z = torch.randn(1, 4, 20, 20, 20)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        vae.decode_stage_2_outputs(torch.randn(1, 4, 4, 4, 4))  # warm up the backend's one-off allocations
        base = rss()
        if sys.argv[1] == "full":
            vae.decode_stage_2_outputs(z)
        else:
            decode_tiled(vae, z, memory_budget_bytes=8 << 20)
    print(json.dumps({"base": base, "peak": rss()}))
""")


def test_tiled_decode_peak_memory_is_at_most_half_of_untiled():
    """Peak RSS in fresh processes: what the decode adds on top of the loaded network."""
    added = {}
    for method in ("full", "tiled"):
        done = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, method],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        added[method] = result["peak"] - result["base"]
    assert added["tiled"] <= 0.5 * added["full"], added


def test_decode_and_encode_methods(tiny):
    z = _latent(5, 6, 4)
    full = decode(tiny, 2.0 * z, 2.0, method="full")
    tiled = decode(tiny, 2.0 * z, 2.0, method="tiled", memory_budget_bytes=1 << 19)
    assert tiled.dtype == torch.float32 and tiled.device.type == "cpu"
    assert (tiled - full).abs().max().item() <= TOL
    x = full.clamp(0, 1)
    mu_tiled = encode(tiny, x, method="tiled", memory_budget_bytes=1 << 19)
    assert (mu_tiled - encode(tiny, x, method="full")).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="method must be one of"):
        decode(tiny, z, 1.0, method="tiles")  # type: ignore[arg-type]


def test_refusals(tiny):
    with pytest.raises(ValueError, match="below one voxel"):
        decode_tiled(tiny, _latent(4, 4, 4), memory_budget_bytes=1000)
    with pytest.raises(ValueError, match="max_tile_voxels must be a positive integer"):
        decode_tiled(tiny, _latent(4, 4, 4), max_tile_voxels=0)
    with pytest.raises(ValueError, match="part must be"):
        plan_tiles(tiny, (1, 4, 4, 4, 4), part="unet")
    kwargs = {**get_preset("tiny-rflow").autoencoder, "attention_levels": [False, False, True]}
    attention = AutoencoderKlMaisi(**kwargs, num_splits=1, dim_split=1)
    with pytest.raises(ValueError, match="attention needs the whole volume"):
        decode_tiled(attention, _latent(4, 4, 4))


def _kind(step: Step) -> str:
    """What the tiled engine does for a step, as a name (the adapter's vocabulary)."""
    extras = [
        ("shortcut", step.shortcut is not None),
        ("upsample", step.upsample),
        ("transposed", step.transposed),
        ("end_pad", step.end_pad),
        ("norm", step.norm is not None and step.role == "plain"),
    ]
    return "+".join([step.role] + [name for name, on in extras if on])


@pytest.mark.parametrize(
    "arch",
    [
        {},  # the tiny preset: channels 8/16/16, one ResBlock per level
        {
            "num_channels": [8, 8, 16],
            "num_res_blocks": [2, 1, 2],
            "num_splits": 2,
            "dim_split": 1,
        },  # MONAI's splits
        {"use_convtranspose": True},  # transposed upsampling, as MAISI's mask VAE
        {"use_convtranspose": True, "num_splits": 2, "dim_split": 1},
    ],
)
def test_adapter_parity_with_monai_forward(arch):
    """Tiled == MONAI's own decode and encode (posterior clamp included) on tiny VAEs that use every kind of
    step the adapter emits: run for the installed MONAI, i.e. for every version the pin lets CI install."""
    kwargs = {**get_preset("tiny-rflow").autoencoder, "num_splits": 1, "dim_split": 0, **arch}
    torch.manual_seed(0)
    vae = AutoencoderKlMaisi(**kwargs).eval()
    with torch.no_grad():  # log-variance far beyond both clamp bounds in two of the four channels
        vae.quant_conv_log_sigma.conv.bias.copy_(torch.tensor([40.0, -40.0, 0.0, 0.0]))
    kinds = {_kind(step) for part in ("decoder", "encoder") for step in program(vae, part)}
    upsampling = "plain+transposed" if arch.get("use_convtranspose") else "plain+upsample"
    assert kinds == {"plain", "plain+norm", upsampling, "plain+end_pad", "res_a", "res_a+shortcut", "res_b"}
    z = _latent(5, 8, 3, batch=2)
    with torch.no_grad():
        expected = vae.decode_stage_2_outputs(z)
        mu, sigma = vae.encode(expected.clamp(0, 1))
    assert (decode_tiled(vae, z, max_tile_voxels=40) - expected).abs().max().item() <= TOL
    streamed = decode_tiled(vae, z, max_tile_voxels=40, stream_levels=True)
    assert (streamed - expected).abs().max().item() <= TOL
    got_mu, got_sigma = encode_tiled(vae, expected.clamp(0, 1), max_tile_voxels=40)
    assert got_mu.shape == mu.shape == (2, 4, 5, 8, 3)
    assert (got_mu - mu).abs().max().item() <= TOL
    assert torch.equal(got_sigma[:, :2], sigma[:, :2])  # exp(20 / 2) and exp(-30 / 2): MONAI's clamp
    assert torch.allclose(got_sigma, sigma, rtol=1e-5, atol=TOL)


def test_every_preset_vae_is_recognised():
    """The default decode of every shipped preset (the released MAISI VAE included) takes the tiled path."""
    for name in PRESETS:
        torch.manual_seed(0)
        vae = build_network(get_preset(name), "autoencoder")
        assert [check_structure(vae, part) for part in ("decoder", "encoder")] == [None, None], name


class _Wrapped(torch.nn.Module):
    """A module the adapter does not know, with the same arithmetic as the block it wraps."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _with_wrapped_resblock(vae: torch.nn.Module, part: str) -> tuple[torch.nn.Module, int]:
    vae = copy.deepcopy(vae)
    blocks = getattr(vae, part).blocks
    k = next(i for i, block in enumerate(blocks) if type(block) is MaisiResBlock)
    blocks[k] = _Wrapped(blocks[k])
    return vae, k


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_unrecognised_structure_warns_once_and_runs_the_whole_volume(tiny, part):
    vae, k = _with_wrapped_resblock(tiny, part)
    z = _latent(5, 6, 4)
    x = decode(tiny, z, 1.0, method="full").clamp(0, 1)
    run = {
        "decoder": lambda method: decode(vae, 2.0 * z, 2.0, method=method, memory_budget_bytes=1 << 19),
        "encoder": lambda method: encode(vae, x, method=method, memory_budget_bytes=1 << 19),
    }[part]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run("tiled")
    fallbacks = [w for w in caught if issubclass(w.category, TilingFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert fallbacks[0].filename == __file__  # points at the caller of decode()/encode()
    fallbacks = [str(fallbacks[0].message)]
    assert f"cannot tile {part}.blocks.{k} (_Wrapped): not a block this adapter knows" in fallbacks[0]
    assert "whole-volume" in fallbacks[0]
    assert torch.equal(got, run("full"))  # bit-identical: the whole-volume pass ran, not tiles
    other = "encoder" if part == "decoder" else "decoder"
    assert check_structure(vae, other) is None  # the untouched part still tiles


def _mutated(tiny: torch.nn.Module, how: str) -> torch.nn.Module:
    vae = copy.deepcopy(tiny)
    block = vae.decoder.blocks[1]
    assert type(block) is MaisiResBlock
    if how == "subclass":  # a subclass may override forward()
        block.__class__ = type("MyResBlock", (MaisiResBlock,), {})
    elif how == "activation":  # a MONAI Convolution with norm/activation after the convolution
        vae.decoder.blocks[0].conv = Convolution(3, 4, 16, kernel_size=3, act="PRELU", norm=None)
    elif how == "parameter":  # a parameter MONAI's forward might use and the tiles would not
        block.scale = torch.nn.Parameter(torch.ones(1))
    elif how == "transposed":  # a transposed upsampling whose stride leaves outputs no kernel tap reaches
        kwargs = {**get_preset("tiny-rflow").autoencoder, "use_convtranspose": True}
        vae = AutoencoderKlMaisi(**kwargs, num_splits=1, dim_split=0)
        vae.decoder.blocks[2].conv.conv.conv = torch.nn.ConvTranspose3d(16, 16, 1, stride=2, output_padding=1)
    elif how == "attribute":  # an attribute the adapter reads, gone (as another MONAI version might have it)
        del vae.decoder.blocks[2].use_convtranspose
    elif how == "not_a_vae":
        vae = torch.nn.Sequential(torch.nn.Conv3d(4, 1, 1))
    return vae


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (
            "subclass",
            "decoder.blocks.1 (MyResBlock): a subclass of MONAI's MaisiResBlock, whose forward may differ",
        ),
        (
            "activation",
            "decoder.blocks.0.conv (Convolution) has submodules ['conv', 'adn'], expected ['conv']",
        ),
        ("parameter", "decoder.blocks.1.scale is not used by the tiled path (1 unused)"),
        ("transposed", "decoder.blocks.2.conv.conv.conv is ConvTranspose3d"),
        ("attribute", "decoder: 'MaisiUpsample' object has no attribute 'use_convtranspose'"),
        ("not_a_vae", "autoencoder is Sequential, expected MONAI's AutoencoderKL"),
    ],
)
def test_structure_check_names_what_it_does_not_know(tiny, how, message):
    vae = _mutated(tiny, how)
    assert message in check_structure(vae, "decoder")
    with pytest.raises(UnsupportedStructure, match=re.escape(message)):
        decode_tiled(vae, _latent(4, 4, 4))
