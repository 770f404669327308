"""DDIM timestep spacing: MONAI 1.6's linspace and the seeds' leading spacing, analytically."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from maisi.errors import InputError
from maisi.families.ct import NoiseSchedule
from maisi.sampling import denoise, make_scheduler, set_timesteps
from tests.test_sampling import GAUSSIAN_NOISE, GaussianEpsilonOracle

CPU = torch.device("cpu")
SHAPE = (1, 1, 8, 8)


def timesteps(spacing: str | None, steps: int, explicit: str | None = None) -> list[int]:
    scheduler = make_scheduler(
        NoiseSchedule("ddpm"), "ddim", **({"timestep_spacing": spacing} if spacing else {})
    )
    set_timesteps(scheduler, steps, SHAPE, CPU, explicit)
    assert scheduler.timesteps.dtype == torch.long
    return scheduler.timesteps.tolist()


def test_leading_spacing_is_the_seeds_980_960_to_0():
    assert timesteps("leading", 50) == list(range(980, -1, -20))
    assert timesteps("leading", 7) == [852, 710, 568, 426, 284, 142, 0]  # stride 1000 // 7 = 142
    assert timesteps(None, 50, explicit="leading") == list(range(980, -1, -20))  # the argument wins


def test_default_spacing_is_monais():
    monai = DDIMScheduler(num_train_timesteps=1000)
    monai.set_timesteps(50)
    assert timesteps(None, 50) == timesteps("linspace", 50) == monai.timesteps.tolist()
    assert timesteps(None, 50)[:2] == [999, 979] and timesteps(None, 50)[-1] == 0
    assert timesteps("leading", 50, explicit="linspace") == monai.timesteps.tolist()


@pytest.mark.parametrize("steps", [7, 50])
def test_ddim_with_leading_spacing_is_exact_ddim_on_its_timesteps(steps):
    """Closed form as in test_sampling: each step from level a to the next timestep's level b (1 after the
    last) multiplies x by (sqrt(a b) s^2 + sqrt((1 - a)(1 - b))) / (a s^2 + 1 - a), on data N(0, s^2)."""
    scheduler = make_scheduler(NoiseSchedule("ddpm"), "ddim", "leading")
    out = denoise(
        GaussianEpsilonOracle(scheduler.alphas_cumprod, 0.5),
        scheduler,
        GAUSSIAN_NOISE,
        steps,
        {},
        progress=False,
    )
    ac = scheduler.alphas_cumprod.double()
    levels = [float(ac[t]) for t in range((steps - 1) * (1000 // steps), -1, -(1000 // steps))] + [1.0]
    gain = 1.0
    for a, b in zip(levels[:-1], levels[1:]):
        gain *= ((a * b) ** 0.5 * 0.25 + ((1 - a) * (1 - b)) ** 0.5) / (a * 0.25 + 1 - a)
    assert torch.allclose(out / GAUSSIAN_NOISE, torch.full_like(out, gain), rtol=1e-4, atol=0)
    assert scheduler.timesteps[0] == (steps - 1) * (1000 // steps)


def test_spacing_is_refused_where_it_means_nothing():
    with pytest.raises(
        InputError, match="timestep_spacing 'leading' is for DDIM; rectified flow has its own"
    ):
        make_scheduler(NoiseSchedule("rflow"), "rflow", "leading")
    with pytest.raises(
        InputError, match=r"timestep_spacing 'trailing' is not one of \['linspace', 'leading'\]"
    ):
        make_scheduler(NoiseSchedule("ddpm"), "ddim", "trailing")  # type: ignore[arg-type]
    ddpm = make_scheduler(NoiseSchedule("ddpm"), "ddpm", "leading")  # every timestep: the same either way
    set_timesteps(ddpm, 1000, SHAPE, CPU)
    assert ddpm.timesteps.tolist() == list(range(999, -1, -1))


def test_with_leading_spacing_the_loop_is_monais_own_ddim_step_as_the_seeds_sampled():
    """On leading timesteps MONAI's DDIMScheduler.step (to t - T // n, then alpha 1 after t = 0) lands on
    the next timestep, as GenerativeModels' did: the loop equals its plain step chain."""
    scheduler = make_scheduler(NoiseSchedule("ddpm"), "ddim", "leading")
    oracle = GaussianEpsilonOracle(scheduler.alphas_cumprod, 0.5)
    out = denoise(oracle, scheduler, GAUSSIAN_NOISE, 50, {}, progress=False)
    x = GAUSSIAN_NOISE
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t.view(1)), t, x)[0]
    assert torch.allclose(out, x, rtol=1e-5, atol=1e-6)
