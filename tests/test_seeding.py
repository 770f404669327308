"""Independent noise per sample and purpose: consecutive seeds share no stream, a seed reproduces its own,
and samples written under another stream derivation are generated again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi import infer, seeding
from maisi.generation import plan as generation
from maisi.masks import generation as mask_generation
from tests.test_infer_mask_generation import mask_generator, size_config  # noqa: F401 - fixtures


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def spy_denoise(module, monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record, for every call of ``module.denoise``, its starting noise and the first draw of its step
    generator (what the first stochastic step adds); the run goes on with the real loop."""
    calls: list[dict[str, torch.Tensor]] = []
    real = module.denoise

    def spy(unet, scheduler, noise, *args, generator=None, **kwargs):
        probe = torch.Generator().set_state(generator.get_state())  # CPU: the same stream, untouched
        calls.append({"noise": noise.cpu().clone(), "step": torch.randn(noise.shape, generator=probe)})
        return real(unet, scheduler, noise, *args, generator=generator, **kwargs)

    monkeypatch.setattr(module, "denoise", spy)
    return calls


def assert_independent(calls: list[dict[str, torch.Tensor]]) -> None:
    """Calls of seeds s and s + 1: no stream of one is a stream of the other, nor of itself."""
    (a, b), limit = calls, 0.1
    assert abs(correlation(a["step"], b["noise"])) < limit  # was 1.0: seed s's step noise = seed s+1's start
    assert abs(correlation(a["noise"], b["noise"])) < limit
    assert abs(correlation(a["step"], b["step"])) < limit
    assert abs(correlation(a["noise"], a["step"])) < limit


def test_consecutive_ct_samples_share_no_noise(infer_config, monkeypatch):
    calls = spy_denoise(generation, monkeypatch)
    # rflow: the step generator is passed to every sampler (DDPM, 1000 steps, draws from it at each step)
    config = infer_config(num_samples=2, sampling={"num_inference_steps": 2})
    assert infer.main(["--config", str(config)]) == 0
    assert len(calls) == 2 and calls[0]["noise"].numel() >= 1000
    assert_independent(calls)


def test_consecutive_generated_masks_share_no_noise(size_config, monkeypatch):  # noqa: F811 - the fixture
    calls = spy_denoise(mask_generation, monkeypatch)
    config = size_config([["liver", 0.5]])
    data = json.loads(config.read_text())
    data["num_samples"] = 2
    config.write_text(json.dumps(data))
    assert infer.main(["--config", str(config)]) == 0
    assert len(calls) == 2
    assert_independent(calls)


def test_a_seed_reproduces_its_streams_and_its_purposes_are_independent():
    draws = {
        (seed, purpose): torch.randn(4096, generator=seeding.torch_generator(seed, purpose))
        for seed in (0, 1, 2**32 - 1)
        for purpose in seeding.PURPOSES
    }
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert abs(correlation(draws[a], draws[b])) < 0.1, (a, b)
    again = torch.randn(4096, generator=seeding.torch_generator(1, "step_noise"))
    assert torch.equal(again, draws[1, "step_noise"])
    assert seeding.stream_seed(3, "lesion", 1) != seeding.stream_seed(4, "lesion", 0)  # not seed + i
    assert 0 <= seeding.stream_seed(7, "augment", bits=32) < 2**32


def test_samples_of_another_stream_derivation_are_not_mixed_with_new_ones(
    infer_config, tmp_path, monkeypatch, capsys
):
    """A folder of samples made under the old derivation (seed, seed + 1) is another job: not skipped as
    finished (that would mix the two), refused without a byte changed; the run into a new folder makes them
    again."""
    config = infer_config()
    assert infer.main(["--config", str(config)]) == 0
    out = Path(tmp_path) / "out"
    meta = json.loads((out / "sample_seed0.json").read_text())
    assert meta["noise_streams"] == seeding.STREAMS
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(seeding, "STREAMS", "seed, seed + 1")  # the next version's derivation
    assert infer.main(["--config", str(config)]) == 2
    assert "holds sample_seed0.json from another job" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert infer.main(["--config", str(config), "--output-dir", str(tmp_path / "again")]) == 0


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        seeding.stream_seed(seed, "initial_noise")
