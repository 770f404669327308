"""The CUDA path: half precision, flash attention, the tiled decoder with pinned host slabs, NCCL.

Opt-in (``python -m pytest -m gpu``) and skipped without CUDA; CI has no GPU. Run on a GPU machine before a
release and record the result in the issue note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maisi.conditioning import Conditions
from maisi.families.ct import get_preset
from maisi.families.networks import RuntimeOptions, build_network
from maisi.sampling import denoise, make_scheduler
from maisi.vae.codec import decode
from tests.test_encode import encode_setup  # noqa: F401 - a fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[1]


def _networks(preset_name: str, device: torch.device):
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    runtime = RuntimeOptions.for_device(device)  # flash attention and float16 normalisation on CUDA
    parts = ("autoencoder", "diffusion_unet", "controlnet")
    return preset, {part: build_network(preset, part, runtime).to(device).eval() for part in parts}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_denoising_with_flash_attention_stays_finite_and_close_to_float32(dtype):
    device = torch.device("cuda")
    preset, nets = _networks("tiny-rflow", device)
    noise = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = Conditions((1.5, 1.5, 1.5), modality="ct").network_inputs(preset, 1, device)
    control = torch.zeros(1, 8, 64, 64, 64, device=device)
    runs = {}
    for name, autocast in (("float32", None), ("half", dtype)):
        runs[name] = denoise(
            nets["diffusion_unet"],
            make_scheduler(preset.schedule, "rflow"),
            noise.clone(),
            3,
            inputs,
            controlnet=nets["controlnet"],
            control=control,
            autocast_dtype=autocast,
            generator=torch.Generator(device=device).manual_seed(1),
            progress=False,
        )
    assert torch.isfinite(runs["half"]).all()
    assert (runs["half"].float() - runs["float32"]).abs().max() < 0.1


def test_tiled_decode_with_pinned_host_slabs_equals_the_whole_volume_pass():
    device = torch.device("cuda")
    _, nets = _networks("tiny-rflow", device)
    latents = torch.randn(1, 4, 24, 24, 16, generator=torch.Generator().manual_seed(0)).to(device)
    full = decode(nets["autoencoder"], latents, 1.0, method="full")
    tiled = decode(nets["autoencoder"], latents, 1.0, method="tiled", memory_budget_bytes=8 << 20)
    assert tiled.shape == full.shape == (1, 1, 96, 96, 64)
    assert (tiled.to(full.device) - full).abs().max() < 1e-3


def test_infer_end_to_end_on_cuda(infer_config, tmp_path):
    from maisi.infer import main

    config = infer_config(device="cuda")
    assert main(["--config", str(config)]) == 0
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["device"].startswith("cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_process_nccl_encoding_writes_one_datalist(encode_setup, tmp_path):  # noqa: F811 - imported fixture
    config = encode_setup(device="cuda")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "maisi.encode",
            "--config",
            str(config),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    datalist = json.loads((tmp_path / "emb" / "datalist.json").read_text())
    assert len(datalist["training"]) >= 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_cuda_graph_sampling_with_cached_condition_is_close_to_float32_eager(dtype):
    """maisi.acceleration on CUDA: torch.compile in reduce-overhead mode (CUDA graphs) of the UNet and the
    ControlNet body, the condition embedding cached, half-precision autocast."""
    from maisi.acceleration import Acceleration, ConditionCachingControlNet, accelerate

    torch._dynamo.reset()
    device = torch.device("cuda")
    preset, nets = _networks("tiny-rflow", device)
    noise = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = Conditions((1.5, 1.5, 1.5), modality="ct").network_inputs(preset, 1, device)
    control = (
        (torch.rand(1, 8, 64, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float().to(device)
    )

    def run(unet, controlnet, autocast):
        return denoise(
            unet,
            make_scheduler(preset.schedule, "rflow"),
            noise.clone(),
            4,
            inputs,
            controlnet=controlnet,
            control=control,
            autocast_dtype=autocast,
            progress=False,
        )

    reference = run(nets["diffusion_unet"], nets["controlnet"], None)
    acceleration = Acceleration.for_run("auto", device)
    assert acceleration.compile  # "auto" compiles on CUDA
    unet, controlnet = accelerate(nets["diffusion_unet"], nets["controlnet"], device, acceleration)
    assert isinstance(controlnet, ConditionCachingControlNet)
    first = run(unet, controlnet, dtype)
    second = run(unet, controlnet, dtype)  # replays the CUDA graphs
    assert torch.isfinite(second).all()
    assert torch.equal(first, second)
    assert (second.float() - reference).abs().max() < 0.1
