"""The diffusion stage's training target follows the preset's prediction type (epsilon or v)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maisi.families.ct import NoiseSchedule, get_preset
from maisi.training.diffusion import denoising_loss, training_scheduler


class RecordingUNet(torch.nn.Module):
    """Outputs 0.1 x; records the noised input and timesteps it was given."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, timesteps, **_):
        self.seen.append((x.clone(), timesteps.clone()))
        return 0.1 * x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_step_target_is_the_noise_or_monais_velocity(prediction_type):
    preset = dataclasses.replace(
        get_preset("tiny-ddpm"), schedule=NoiseSchedule("ddpm", prediction_type=prediction_type)
    )
    scheduler = training_scheduler(preset)
    latents = torch.randn(3, 4, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    unet = RecordingUNet()
    loss, output, target = denoising_loss(
        unet, scheduler, latents, {}, generator=torch.Generator().manual_seed(5)
    )
    # the same draws, in the order add_training_noise takes them: noise, then timesteps
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    noisy, seen_t = unet.seen[0]
    assert torch.equal(seen_t, timesteps)
    assert torch.allclose(noisy, scheduler.add_noise(latents, noise, timesteps))
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    assert torch.allclose(target, expected)
    assert torch.allclose(loss, (output - expected).abs().mean())
    if prediction_type == "v_prediction":  # v differs from the noise wherever a timestep is not near 0
        assert not torch.allclose(target, noise, atol=0.1)
