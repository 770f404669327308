"""Run-time speed switches (maisi.acceleration): the ControlNet's cached condition embedding is exact, the
compiled / bfloat16 / channels_last paths stay close to float32 eager, and the ``compile`` key resolves as
documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maisi import device as device_module
from maisi import infer
from maisi.acceleration import Acceleration, ConditionCachingControlNet, accelerate, resolve_compile
from maisi.conditioning import Conditions
from maisi.device import autocast_dtype
from maisi.families.ct import get_preset
from maisi.families.networks import build_network
from maisi.sampling import denoise, make_scheduler

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _tiny(seed: int = 0):
    preset = get_preset("tiny-rflow")
    torch.manual_seed(seed)
    unet, controlnet = (build_network(preset, p).eval() for p in ("diffusion_unet", "controlnet"))
    noise = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (1, 8, 64, 64, 64), generator=torch.Generator().manual_seed(1))
    inputs = Conditions((1.5, 1.5, 1.5), modality="ct").network_inputs(preset, 1, CPU)
    return preset, unet, controlnet, noise, labels.float(), inputs


def _sample(preset, unet, controlnet, noise, control, inputs, dtype=None, steps=3) -> torch.Tensor:
    return denoise(
        unet,
        make_scheduler(preset.schedule, "rflow"),
        noise.clone(),
        steps,
        inputs,
        controlnet=controlnet,
        control=control,
        autocast_dtype=dtype,
        progress=False,
    )


def _counting(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@torch.no_grad()
def test_cached_condition_embedding_gives_monai_s_residuals_exactly_and_runs_once_per_mask():
    _, _, controlnet, noise, control, inputs = _tiny()
    keys_before = list(controlnet.state_dict())
    cached = ConditionCachingControlNet(controlnet)
    calls = _counting(controlnet.controlnet_cond_embedding)
    for t in (900.0, 500.0, 10.0):
        args = dict(x=noise, timesteps=torch.tensor([t]), class_labels=inputs["class_labels"])
        down, mid = controlnet(**args, controlnet_cond=control, conditioning_scale=0.7)  # MONAI's own
        down_c, mid_c = cached(**args, controlnet_cond=control, conditioning_scale=0.7)
        assert len(down) == len(down_c) and all(torch.equal(a, b) for a, b in zip(down, down_c))
        assert torch.equal(mid, mid_c)
    assert len(calls) == 3 + 1  # MONAI's forward three times, the cache once
    # The wrapped network is untouched: same modules and weights, so checkpoints still load into it.
    assert list(controlnet.state_dict()) == keys_before
    assert not isinstance(controlnet.controlnet_cond_embedding, torch.nn.Identity)


@torch.no_grad()
def test_cache_recomputes_for_another_mask_a_modified_mask_and_another_autocast_state():
    _, _, controlnet, noise, control, inputs = _tiny()
    cached = ConditionCachingControlNet(controlnet)
    calls = _counting(cached.embedding)
    args = dict(x=noise, timesteps=torch.tensor([500.0]), class_labels=inputs["class_labels"])
    cached(**args, controlnet_cond=control)
    cached(**args, controlnet_cond=control.clone())  # another tensor
    assert len(calls) == 2
    other = control.clone()
    cached(**args, controlnet_cond=other)
    other[:, :, :8] = 1.0 - other[:, :, :8]  # modified in place: the embedding must follow
    down, mid = cached(**args, controlnet_cond=other)
    assert len(calls) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached(**args, controlnet_cond=other)
    assert len(calls) == 5
    ref_down, ref_mid = controlnet(**args, controlnet_cond=other)  # MONAI's own forward, float32
    assert torch.equal(mid, ref_mid) and all(torch.equal(a, b) for a, b in zip(down, ref_down))


def test_the_cache_does_not_keep_the_mask_alive():
    _, _, controlnet, noise, control, inputs = _tiny()
    cached = ConditionCachingControlNet(controlnet)
    with torch.no_grad():
        cached(
            x=noise,
            timesteps=torch.tensor([1.0]),
            controlnet_cond=control,
            class_labels=inputs["class_labels"],
        )
    assert cached._cond is not None and cached._cond() is control
    del control
    assert cached._cond() is None


@pytest.mark.parametrize(
    "setting, device, expected",
    [("auto", CPU, False), ("auto", CUDA, True), (True, CPU, True), (False, CUDA, False)],
)
def test_compile_auto_is_on_for_cuda_and_off_for_cpu(setting, device, expected):
    assert resolve_compile(setting, device) is expected
    assert Acceleration.for_run(setting, device).compile is expected


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_on_cpu_is_bfloat16_for_generation_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: native)
    assert autocast_dtype("auto", CPU, cpu_bfloat16=True) == (torch.bfloat16 if native else None)
    assert autocast_dtype("auto", CPU) is None  # encoding and evaluation keep float32 on CPU
    assert autocast_dtype("auto", CUDA, cpu_bfloat16=True) == torch.float16
    assert autocast_dtype("float32", CPU, cpu_bfloat16=True) is None


def test_generation_decodes_in_float32_on_cpu_under_auto(tiny_checkpoints, tmp_path, monkeypatch):
    """The networks may run in bfloat16 on CPU, the VAE decode does not: in bfloat16 the demo's bone medians
    failed the HU check on every try (float32 decode: passed on the first)."""
    from maisi.config import load_config
    from maisi.generation.plan import load_models
    from tests.conftest import write_config

    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: True)
    data = {
        "preset": "tiny-rflow",
        "checkpoints": {p: str(f) for p, f in tiny_checkpoints["tiny-rflow"].items()},
        "output_size": [32, 32, 32],
        "spacing": [4.0, 4.0, 4.0],
        "device": "cpu",
    }
    for precision, networks, decode in (
        ("auto", torch.bfloat16, None),
        ("bfloat16", torch.bfloat16, torch.bfloat16),
    ):
        config = load_config(
            write_config(tmp_path / f"{precision}.json", {**data, "precision": precision}), "infer"
        )
        models = load_models(config, CPU)
        assert (models.dtype, models.decode_dtype) == (networks, decode), precision


# Tolerances on the latent after 3 rectified-flow steps (values of order 1): bfloat16 keeps 8 bits of
# mantissa (relative rounding 2^-8 ~ 0.004 per op), so 0.1 absolute; float32 variants 1e-4.
@pytest.mark.parametrize(
    "name, acceleration, dtype, tol",
    [
        ("cached condition", Acceleration(), None, 1e-5),
        ("channels_last_3d", Acceleration(channels_last=True), None, 1e-4),
        ("bfloat16", Acceleration(), torch.bfloat16, 0.1),
        ("compiled (dynamo trace)", Acceleration(compile=True, compile_backend="eager"), None, 1e-4),
    ],
)
def test_accelerated_sampling_is_close_to_float32_eager(name, acceleration, dtype, tol):
    torch._dynamo.reset()
    preset, unet, controlnet, noise, control, inputs = _tiny()
    reference = _sample(preset, unet, controlnet, noise, control, inputs)
    fast_unet, fast_controlnet = accelerate(unet, controlnet, CPU, acceleration)
    fast = _sample(preset, fast_unet, fast_controlnet, noise, control, inputs, dtype)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape
    assert torch.isfinite(fast).all()
    assert (fast - reference).abs().max().item() < tol, name


@pytest.mark.slow
def test_inductor_compiled_sampling_is_close_to_float32_eager():
    """Inductor generates and builds C++: minutes on 2 shared cores, hence opt-in (-m slow)."""
    torch._dynamo.reset()
    preset, unet, controlnet, noise, control, inputs = _tiny()
    reference = _sample(preset, unet, controlnet, noise, control, inputs)
    fast_unet, fast_controlnet = accelerate(unet, controlnet, CPU, Acceleration(compile=True))
    fast = _sample(preset, fast_unet, fast_controlnet, noise, control, inputs)
    assert (fast - reference).abs().max().item() < 1e-4


def test_compile_key_appears_in_the_dry_run(infer_config, capsys, tmp_path):
    assert infer.main(["--config", str(infer_config()), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["compile"] == "auto"
    assert infer.main(["--config", str(infer_config(compile=False)), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["compile"] is False
    assert not (tmp_path / "out").exists()


def test_bad_compile_value_is_refused_naming_the_key(infer_config, capsys, tmp_path):
    assert infer.main(["--config", str(infer_config(compile="yes"))]) == 2
    err = capsys.readouterr().err
    assert "$.compile" in err and "yes" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_rerun_that_changes_only_speed_settings_skips_the_finished_samples(
    infer_config, tmp_path, caplog, capsys
):
    out = tmp_path / "out"
    assert infer.main(["--config", str(infer_config(compile=False))]) == 0
    files = sorted(p for p in out.iterdir() if p.name.startswith("sample_seed0"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    key = json.loads((out / "sample_seed0.json").read_text())["job_key"]
    # compile=True on the CPU would take minutes to compile: a skipped sample never calls the networks
    faster = infer_config(compile=True, decoding={"memory_budget_mb": 64})
    caplog.clear()
    assert infer.main(["--config", str(faster)]) == 0
    assert "0 generated, 1 skipped" in caplog.records[-1].getMessage()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert f"sample_job-{key[:12]}_config.json" in {p.name for p in out.iterdir()}
    # the precision changes the numbers: another job, refused (exit 2), nothing overwritten
    assert infer.main(["--config", str(infer_config(compile=False, precision="bfloat16"))]) == 2
    assert "from another job" in capsys.readouterr().err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before


def test_load_models_applies_the_switches(infer_config):
    from maisi.config import load_config
    from maisi.generation.plan import load_models, plan_generation

    plan = plan_generation(load_config(infer_config(compile=False), "infer"))
    models = load_models(plan, CPU)
    assert isinstance(models.controlnet, ConditionCachingControlNet)
    assert models.acceleration == Acceleration(compile=False)
    assert models.acceleration.describe(CPU)["controlnet_condition_cached"] is True


def test_gpu_benchmark_script_runs_its_cpu_dry_path():
    """tools/bench_gpu.sh --dry-run: tiny preset on the CPU, so the GPU script cannot rot unseen."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "bench_gpu.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.startswith(("maisi ", "ours "))
    }
    assert set(rows) == {"maisi", "ours"}
    assert rows["maisi"][-1] == "inf" and float(rows["ours"][-1]) >= 40.0  # PSNR against MAISI's way
    assert "bench_gpu.sh:" in done.stdout
