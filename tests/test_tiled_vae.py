"""Tiled VAE decoding/encoding equals MONAI's whole-volume pass, within a measured memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from maisi.decoding import decode, encode
from maisi.networks import build_network, get_preset
from maisi.tiled_vae import TilingTrace, decode_tiled, encode_tiled, plan_tiles

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


@pytest.mark.parametrize(("shape", "limit"), [
    ((5, 7, 3), {"max_tile_voxels": 7}), ((6, 4, 9), {"max_tile_voxels": 7}), ((5, 7, 3), {"max_tile_voxels": 100}),
    ((8, 8, 8), {"max_tile_voxels": 100}), ((6, 4, 9), {"memory_budget_bytes": 1 << 19}),
    ((8, 8, 8), {"memory_budget_bytes": 1 << 19}), ((5, 7, 3), {"memory_budget_bytes": 1 << 30}),
])  # fmt: skip
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
@pytest.mark.parametrize("limit", [{"max_tile_voxels": 30}, {"max_tile_voxels": 500}, {"memory_budget_bytes": 1 << 20}])
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


def test_small_preset_decode_and_encode(small):
    z = _latent(6, 5, 7)
    with torch.no_grad():
        expected = small.decode_stage_2_outputs(z)
        mu, _ = small.encode(expected.clamp(0, 1))
    trace = TilingTrace()
    assert (decode_tiled(small, z, memory_budget_bytes=1 << 21, trace=trace) - expected).abs().max().item() <= TOL
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
    assert (encode_tiled(vae, expected.clamp(0, 1), memory_budget_bytes=16 << 20)[0] - mu).abs().max().item() <= TOL


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
    tiles = [sum(p.tile[0] * p.tile[1] * p.tile[2] for p in plan_tiles(small, shape, memory_budget_bytes=b))
             for b in (1 << 18, 1 << 21, 1 << 24)]  # fmt: skip
    assert tiles[0] < tiles[1] < tiles[2]


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from maisi.networks import build_network, get_preset
    from maisi.tiled_vae import decode_tiled
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
        done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, method], capture_output=True, text=True, timeout=300)
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
