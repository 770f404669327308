"""Shared fixture of the latent stages' tests: a tiny-rflow train config on the encoded real-CT latents."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import write_config


@pytest.fixture
def latent_train_config(encoded_cases, active_unet, tmp_path) -> Callable[..., Path]:
    """``make(name="train.json", **changes)``: write a tiny-rflow train config (CPU, the encoded real-CT
    latents, the UNet initialised from ``active_unet``, output in ``tmp_path / "run"``) with ``changes``
    applied at the top level; each test module binds its own defaults (``functools.partial``)."""

    def make(name: str = "train.json", **changes) -> Path:
        data = {
            "preset": "tiny-rflow",
            "datalist": str(encoded_cases),
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",
            "init": {"diffusion_unet": str(active_unet)},
            **changes,
        }
        return write_config(tmp_path / name, data)

    return make
