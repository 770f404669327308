"""The denoising loop: exact on analytic problems, equal to MONAI's own inferer, seeded."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from monai.inferers import ControlNetDiffusionInferer

from maisi.conditioning import Conditions
from maisi.errors import InputError
from maisi.families.ct import NoiseSchedule, get_preset
from maisi.families.networks import build_network
from maisi.sampling import denoise, make_scheduler

X0 = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(7))


class EpsilonOracle(torch.nn.Module):
    """Exact noise prediction when the data distribution is the single point X0."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x, timesteps, **_):
        a = self.alphas_cumprod[timesteps.long()].view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * X0) / (1 - a).sqrt()


class GaussianEpsilonOracle(torch.nn.Module):
    """Exact noise prediction E[eps | x_t] when the data are N(0, std^2) per voxel:
    sqrt(1 - a) x_t / (a std^2 + 1 - a). Unlike a single data point, this tells a sampler that ends on the
    right distribution from one that leaves noise in (the single-point oracle lands on X0 at t = 0 anyway)."""

    def __init__(self, alphas_cumprod: torch.Tensor, std: float):
        super().__init__()
        self.alphas_cumprod, self.std = alphas_cumprod, std

    def forward(self, x, timesteps, **_):
        a = self.alphas_cumprod[timesteps.long()].view(-1, 1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * self.std**2 + 1 - a)


GAUSSIAN_NOISE = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))  # 32768 draws


def test_ddpm_ends_on_the_data_distribution():
    scheduler = make_scheduler(NoiseSchedule("ddpm"), "ddpm")
    out = denoise(
        GaussianEpsilonOracle(scheduler.alphas_cumprod, 0.5),
        scheduler,
        GAUSSIAN_NOISE,
        1000,
        {},
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert abs(float(out.std()) - 0.5) < 0.02 and abs(float(out.mean())) < 0.02


def ddim_gaussian_gain(num_steps: int, alphas_cumprod: torch.Tensor, std: float) -> float:
    """out / noise of exact DDIM (eta 0) on N(0, std^2) data: each step from noise level a to the next
    timestep's level b (1 after the last) multiplies x by
    (sqrt(a b) std^2 + sqrt((1 - a)(1 - b))) / (a std^2 + 1 - a).
    Timesteps: MONAI's round(linspace(999, 0, n))."""
    ac = alphas_cumprod.double()
    levels = [float(ac[t]) for t in torch.linspace(999, 0, num_steps).round().long()] + [1.0]
    gain = 1.0
    for a, b in zip(levels[:-1], levels[1:]):
        gain *= ((a * b) ** 0.5 * std**2 + ((1 - a) * (1 - b)) ** 0.5) / (a * std**2 + 1 - a)
    return gain


@pytest.mark.parametrize("steps, rtol", [(2, 1e-2), (7, 1e-4), (33, 1e-4), (50, 1e-4), (999, 1e-4)])
def test_ddim_is_exact_ddim_at_any_step_count(steps, rtol):
    """The loop is linear on Gaussian data, so out / noise is one number per run, known in closed form.
    Without stepping to the next timestep's own noise level (MONAI's DDIMScheduler.step alone goes to
    t - 1000 // n) this fails: 7 steps give 0.46 for 0.31, 2 steps 0.94 (noise) for 0.04."""
    scheduler = make_scheduler(NoiseSchedule("ddpm"), "ddim")
    out = denoise(
        GaussianEpsilonOracle(scheduler.alphas_cumprod, 0.5),
        scheduler,
        GAUSSIAN_NOISE,
        steps,
        {},
        progress=False,
    )
    expected = ddim_gaussian_gain(steps, scheduler.alphas_cumprod, 0.5)
    assert torch.allclose(out / GAUSSIAN_NOISE, torch.full_like(out, expected), rtol=rtol, atol=0)
    assert list(scheduler.timesteps[[0, -1]]) == [999, 0]  # starts from pure noise, ends on t = 0


def test_monais_ddpm_scheduler_cannot_stride_so_fewer_ddpm_steps_are_refused():
    """Why DDPM must run every training timestep: MONAI's DDPMScheduler.step takes t - 1 as the previous
    timestep whatever the stride, so 100 strided steps end with noise left in (std 0.88 for data of std 0.5).
    If a MONAI release fixes this, this test fails: then allow DDPM with fewer steps again."""
    scheduler = make_scheduler(NoiseSchedule("ddpm"), "ddpm")
    scheduler.set_timesteps(100)  # MONAI's own call, past our guard
    oracle, x = GaussianEpsilonOracle(scheduler.alphas_cumprod, 0.5), GAUSSIAN_NOISE
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t.view(1)), t, x, generator=generator)[0]
    assert float(x.std()) > 0.75
    with pytest.raises(ValueError, match="sampler 'ddpm' must run all 1000 training timesteps, got 100"):
        denoise(
            oracle, make_scheduler(NoiseSchedule("ddpm"), "ddpm"), GAUSSIAN_NOISE, 100, {}, progress=False
        )


def test_a_config_asking_ddpm_for_fewer_steps_is_refused_naming_ddim(tmp_path, capsys):
    from maisi.infer import main
    from tests.conftest import write_config

    config = write_config(
        tmp_path / "c.json",
        {
            "preset": "tiny-ddpm",
            "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "u.pt"},
            "output_size": [32, 32, 32],
            "spacing": [2.0, 2.0, 2.0],
            "sampling": {"scheduler": "ddpm", "num_inference_steps": 50},
            "output": {"dir": str(tmp_path / "out")},
        },
    )
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sampler 'ddpm' must run all 1000 training timesteps, got 50" in err and "use 'ddim'" in err
    assert not (tmp_path / "out").exists()


class VelocityOracle(torch.nn.Module):
    """Exact rectified-flow velocity (x0 - noise) for the single point X0: x_t = (1-s) x0 + s noise,
    s = t/T."""

    def forward(self, x, timesteps, **_):
        s = (timesteps / 1000.0).view(-1, 1, 1, 1, 1)
        return (X0 - x) / s


@pytest.mark.parametrize("sampler, steps, tol", [("ddpm", 1000, 1e-4), ("ddim", 50, 1e-5), ("ddim", 3, 1e-5)])
def test_epsilon_samplers_reach_the_data_point(sampler, steps, tol):
    scheduler = make_scheduler(NoiseSchedule("ddpm"), sampler)
    noise = torch.randn(X0.shape, generator=torch.Generator().manual_seed(0))
    out = denoise(
        EpsilonOracle(scheduler.alphas_cumprod),
        scheduler,
        noise,
        steps,
        {},
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert (out - X0).abs().max() < tol


@pytest.mark.parametrize("steps", [1, 5, 30])
def test_rectified_flow_is_exact_on_straight_paths(steps):
    noise = torch.randn(X0.shape, generator=torch.Generator().manual_seed(0))
    out = denoise(
        VelocityOracle(), make_scheduler(NoiseSchedule("rflow"), "rflow"), noise, steps, {}, progress=False
    )
    assert (out - X0).abs().max() < 1e-5


class GaussianVelocityOracle(torch.nn.Module):
    """Exact rectified-flow velocity E[x0 - noise | x_t] when the data are N(0, std^2) per voxel:
    x_t = (1 - s) x0 + s noise, s = t / 1000, so v = ((1 - s) std^2 - s) x_t / ((1 - s)^2 std^2 + s^2)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x, timesteps, **_):
        s = (timesteps.double() / 1000.0).view(-1, 1, 1, 1, 1)
        return (((1 - s) * self.std**2 - s) / ((1 - s) ** 2 * self.std**2 + s**2) * x.double()).float()


def rflow_gaussian_gain(num_steps: int, latent_numel: int, std: float) -> float:
    """out / noise of MAISI's rflow sampling of N(0, std^2) data: s_i = 1 - i / n shifted by
    r = (latent voxels / 32^3)^(1/3) to r s / (1 + (r - 1) s), then 0; each step multiplies x by
    1 + v_gain(t_i) dt_i, with t_i = 1000 s_i in float16 and dt_i = (t_i - floor(t_i+1)) / 1000: MONAI's
    RFlowScheduler.step (and so MAISI) truncates the next timestep to an integer; kept for MAISI parity."""
    r = (latent_numel / 32**3) ** (1 / 3)
    s = [r * u / (1 + (r - 1) * u) for u in (1 - i / num_steps for i in range(num_steps))] + [0.0]
    t = [float(np.float16(1000 * x)) for x in s]  # MONAI keeps the timesteps in float16
    gain = 1.0
    for ta, tb in zip(t[:-1], t[1:]):
        a, dt = ta / 1000, (ta - math.floor(tb)) / 1000
        gain *= 1 + ((1 - a) * std**2 - a) / ((1 - a) ** 2 * std**2 + a**2) * dt
    return gain


@pytest.mark.parametrize("steps", [5, 30, 33])
def test_rectified_flow_follows_maisis_shifted_schedule_exactly(steps):
    """Unlike straight paths (whose last step lands on X0 whatever came before), a Gaussian's curved flow
    shows every step: a schedule shifted by the image size instead of the latent size, no shift, or a
    flipped velocity each miss the closed form."""
    noise = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))  # shift r = 2
    out = denoise(
        GaussianVelocityOracle(0.5),
        make_scheduler(NoiseSchedule("rflow"), "rflow"),
        noise,
        steps,
        {},
        progress=False,
    )
    expected = rflow_gaussian_gain(steps, 64**3, 0.5)
    assert torch.allclose(out / noise, torch.full_like(out, expected), rtol=1e-3, atol=0)


@pytest.mark.parametrize("preset_name, sampler", [("tiny-ddpm", "ddim"), ("tiny-rflow", "rflow")])
def test_loop_equals_monai_controlnet_inferer(preset_name, sampler):
    """The ControlNet and conditioning wiring equals MONAI's inferer. One step: over several, ours
    deliberately differs from MONAI's DDIM step (see the DDIM closed-form test above)."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    unet, controlnet = (
        build_network(preset, "diffusion_unet").eval(),
        build_network(preset, "controlnet").eval(),
    )
    for p in [
        *unet.parameters(),
        *controlnet.parameters(),
    ]:  # zero-initialised outputs would make this trivial
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    inputs = Conditions((1.5, 1.5, 2.0), "chest", "abdomen", "ct").network_inputs(
        preset, 1, torch.device("cpu")
    )
    noise = torch.randn(1, 4, 8, 8, 4)
    control = torch.randint(0, 2, (1, 8, 32, 32, 16)).float()
    ours = denoise(
        unet,
        make_scheduler(preset.schedule, sampler),
        noise,
        1,
        inputs,
        controlnet=controlnet,
        control=control,
        progress=False,
    )

    scheduler = make_scheduler(preset.schedule, sampler)
    kwargs = {"input_img_size_numel": 8 * 8 * 4} if sampler == "rflow" else {}
    scheduler.set_timesteps(1, **kwargs)
    cn_kwargs = {"class_labels": inputs.pop("class_labels")} if "class_labels" in inputs else {}
    with torch.no_grad():
        theirs = ControlNetDiffusionInferer(scheduler).sample(
            noise,
            partial(unet, **inputs, **cn_kwargs),
            partial(controlnet, **cn_kwargs),
            control,
            scheduler=scheduler,
            verbose=False,
        )
    assert torch.allclose(ours, theirs, atol=1e-5)
    without_control = denoise(
        unet, make_scheduler(preset.schedule, sampler), noise, 1, {**inputs, **cn_kwargs}, progress=False
    )
    assert not torch.allclose(ours, without_control, atol=1e-3)  # the residuals do act


def test_ddpm_sampling_is_reproducible_with_a_seeded_generator():
    scheduler = make_scheduler(NoiseSchedule("ddpm"), "ddpm")
    oracle = GaussianEpsilonOracle(scheduler.alphas_cumprod, 0.5)
    noise = torch.randn(1, 4, 4, 4, 4)

    def run(seed):
        return denoise(
            oracle,
            make_scheduler(NoiseSchedule("ddpm"), "ddpm"),
            noise,
            1000,
            {},
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_incompatible_sampler_is_an_input_error():
    with pytest.raises(InputError, match="cannot sample a rflow-trained UNet"):
        make_scheduler(NoiseSchedule("rflow"), "ddpm")
    with pytest.raises(InputError, match="cannot sample a ddpm-trained UNet"):
        make_scheduler(NoiseSchedule("ddpm"), "rflow")


class GaussianVOracle(torch.nn.Module):
    """Exact v-prediction E[v | x_t] for N(0, std^2) data, from the epsilon oracle's posterior means:
    v = sqrt(a) E[eps | x_t] - sqrt(1 - a) E[x0 | x_t]
      = sqrt(a (1 - a)) (1 - std^2) x_t / (a std^2 + 1 - a)."""

    def __init__(self, alphas_cumprod: torch.Tensor, std: float):
        super().__init__()
        self.alphas_cumprod, self.std = alphas_cumprod, std

    def forward(self, x, timesteps, **_):
        a = self.alphas_cumprod[timesteps.long()].view(-1, 1, 1, 1, 1)
        return (a * (1 - a)).sqrt() * (1 - self.std**2) * x / (a * self.std**2 + 1 - a)


V_SCHEDULE = NoiseSchedule("ddpm", prediction_type="v_prediction")


def run_v_ddim(steps: int) -> torch.Tensor:
    scheduler = make_scheduler(V_SCHEDULE, "ddim")
    return denoise(
        GaussianVOracle(scheduler.alphas_cumprod, 0.5), scheduler, GAUSSIAN_NOISE, steps, {}, progress=False
    )


@pytest.mark.parametrize("steps, std_tol", [(10, None), (50, 0.04), (1000, 0.01)])
def test_v_prediction_ddim_is_exact_ddim(steps, std_tol):
    """With the exact v the loop is the same linear map as exact epsilon DDIM (closed form above: gains 0.355,
    0.463, 0.497 for 10, 50, 1000 steps); with 50 and 1000 steps it ends near the data distribution (std 0.5;
    DDIM's own discretisation error shrinks with the step count)."""
    out = run_v_ddim(steps)
    expected = ddim_gaussian_gain(steps, make_scheduler(V_SCHEDULE, "ddim").alphas_cumprod, 0.5)
    assert torch.allclose(out / GAUSSIAN_NOISE, torch.full_like(out, expected), rtol=1e-4, atol=0)
    if std_tol is not None:
        assert abs(float(out.std()) - 0.5) < std_tol


def test_v_prediction_ddim_fails_when_v_is_taken_for_the_noise(monkeypatch):
    """The DDIM re-noising with v in place of epsilon (the loop before the prediction type was threaded
    through) collapses every sample to 0: output/noise gain 1.9e-8 after 10 steps and 7e-37 after 50, instead
    of 0.355 and 0.463 (std 2e-8 for 0.5)."""
    from maisi import sampling

    monkeypatch.setattr(sampling, "predicted_noise", lambda scheduler, output, t, x: output)
    for steps in (10, 50):
        out = run_v_ddim(steps)
        expected = ddim_gaussian_gain(steps, make_scheduler(V_SCHEDULE, "ddim").alphas_cumprod, 0.5)
        assert float(out.std()) < 1e-6 and expected > 0.35


def test_v_prediction_ddpm_ends_on_the_data_distribution():
    scheduler = make_scheduler(V_SCHEDULE, "ddpm")
    out = denoise(
        GaussianVOracle(scheduler.alphas_cumprod, 0.5),
        scheduler,
        GAUSSIAN_NOISE,
        1000,
        {},
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert abs(float(out.std()) - 0.5) < 0.02 and abs(float(out.mean())) < 0.02


def test_schedulers_take_the_prediction_type_and_rflow_refuses_v():
    assert make_scheduler(V_SCHEDULE, "ddim").prediction_type == "v_prediction"
    assert make_scheduler(V_SCHEDULE, "ddpm").prediction_type == "v_prediction"
    assert make_scheduler(NoiseSchedule("ddpm"), "ddim").prediction_type == "epsilon"
    with pytest.raises(ValueError, match="rectified-flow UNet predicts the velocity"):
        NoiseSchedule("rflow", prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        NoiseSchedule("ddpm", prediction_type="sample")  # type: ignore[arg-type]


def test_v_prediction_ddim_at_every_timestep_equals_monais_own_step():
    """With all 1000 timesteps MONAI's DDIMScheduler.step lands on the next timestep's level itself, so
    there the loop must be MONAI's v-prediction DDIM exactly."""
    scheduler = make_scheduler(V_SCHEDULE, "ddim")
    oracle = GaussianVOracle(scheduler.alphas_cumprod, 0.5)
    ours = denoise(oracle, scheduler, GAUSSIAN_NOISE, 1000, {}, progress=False)
    theirs = GAUSSIAN_NOISE
    for t in scheduler.timesteps:
        theirs = scheduler.step(oracle(theirs, t.view(1)), t, theirs)[0]
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
