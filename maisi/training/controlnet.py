"""ControlNet stage: a frozen diffusion UNet, a trainable ControlNet fed the bit-encoded label mask.

The ControlNet starts from the UNet's matching weights (MONAI ``copy_model_state``; its zero-initialised
output convolutions make it a no-op at first) or from a given ControlNet checkpoint. ``weighted_loss``
multiplies the loss on latent voxels covered by ``weighted_loss_label``; the label is max-pooled to the
latent grid, so a lesion of a single image voxel still marks its latent voxel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.utils import copy_model_state

from maisi.checkpoints import load_network, save_checkpoint
from maisi.config.train_config import TrainConfig
from maisi.errors import CheckpointError, InputError
from maisi.labels import is_dummy, load_label_dict
from maisi.networks import Preset, RuntimeOptions, build_network
from maisi.training.diffusion import denoising_loss, training_scheduler, validation_loss
from maisi.training.latent_data import CaseDraw, LatentCases


def lesion_weights(
    labels: torch.Tensor, label_ids: tuple[int, ...], weight: float, factor: int
) -> torch.Tensor:
    """(N, 1, X, Y, Z) labels -> (N, 1, X/f, Y/f, Z/f) loss weights: ``weight`` where any voxel of the
    f x f x f block holds one of ``label_ids``, 1 elsewhere."""
    if not label_ids or weight == 1.0:
        shape = (labels.shape[0], 1, *(s // factor for s in labels.shape[2:]))
        return torch.ones(shape, device=labels.device)
    hit = torch.isin(labels, torch.tensor(label_ids, device=labels.device)).float()
    covered = F.max_pool3d(hit, kernel_size=factor, stride=factor)
    return 1.0 + (weight - 1.0) * covered


class ControlNetStage:
    """Train (or finetune) the ControlNet of a preset against a frozen diffusion UNet."""

    name = "controlnet"

    def __init__(
        self,
        config: TrainConfig,
        preset: Preset,
        train: LatentCases,
        val: LatentCases | None,
        device: torch.device,
    ):
        self.config, self.preset, self.train, self.val, self.device = config, preset, train, val, device
        cfg = config.controlnet
        label_dict = load_label_dict(cfg.label_dict)
        real_classes = {i for n, i in label_dict.items() if not is_dummy(n)}
        unknown = sorted(set(cfg.weighted_loss_label) - real_classes)
        if unknown:
            raise InputError(
                f"$.controlnet.weighted_loss_label: ids {unknown} are not classes of the label dictionary "
                f"({cfg.label_dict or 'MAISI'}); add the class first (python -m maisi.labels add)"
            )
        if not config.init.diffusion_unet:
            raise InputError(
                "$.init.diffusion_unet: the controlnet stage needs the trained diffusion UNet (frozen)"
            )
        runtime = RuntimeOptions(use_flash_attention=False)
        unet, weights = load_network(preset, "diffusion_unet", config.init.diffusion_unet, runtime)
        if weights.scale_factor is None:
            raise CheckpointError(f"{weights.path}: diffusion UNet checkpoint has no scale_factor")
        self.scale_factor = weights.scale_factor
        self.unet = unet.to(device).eval().requires_grad_(False)
        if config.init.controlnet:
            self.model, _ = load_network(preset, "controlnet", config.init.controlnet, runtime)
        else:
            self.model = build_network(preset, "controlnet", runtime)
            copy_model_state(self.model, self.unet.state_dict())
        self.scheduler = training_scheduler(preset)

    def _loss(self, controlnet: torch.nn.Module, batch: dict[str, Any], generator=None):
        cfg = self.config.controlnet
        weights = lesion_weights(
            batch["labels"], cfg.weighted_loss_label, cfg.weighted_loss, self.preset.vae_factor
        )
        class_labels = batch["unet_inputs"].get("class_labels")

        def residuals(noisy: torch.Tensor, timesteps: torch.Tensor) -> dict[str, Any]:
            down, mid = controlnet(
                x=noisy,
                timesteps=timesteps,
                controlnet_cond=batch["control"],
                conditioning_scale=cfg.conditioning_scale,
                class_labels=class_labels,
            )
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return denoising_loss(
            self.unet,
            self.scheduler,
            batch["latents"] * self.scale_factor,
            batch["unet_inputs"],
            residuals=residuals,
            weights=weights,
            generator=generator,
        )

    def batch_draw(self) -> CaseDraw:
        return CaseDraw(self.train, self.config.batch_size)

    def train_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        batch = self.train.to_device(batch, self.device)
        return {"loss": self._loss(model, batch)[0]}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def validate(self, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        model.eval()
        return validation_loss(
            self.val, self.device, lambda batch, generator: self._loss(model, batch, generator)
        )

    def export(self, model: torch.nn.Module, folder: Path, config_sha256: str) -> list[Path]:
        return [
            save_checkpoint(
                folder / "controlnet.pt", model, self.preset, "controlnet", config_sha256=config_sha256
            )
        ]

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass
