"""The autoencoder and diffusion stages for plain-LDM presets (:mod:`maisi.families.ldm`).

* :class:`LDMAutoencoderStage` is the CT autoencoder stage (:class:`maisi.training.autoencoder.
  AutoencoderStage`: reconstruction + KL + perceptual + PatchGAN losses, the discriminator's updates and
  resume state) with the preset's MONAI ``AutoencoderKL`` and 2D slices or 3D patches of the dataset's images
  (:mod:`maisi.training.ldm_data`); validation reconstructs the mid slice (2D) or centre patch (3D) of each
  held-out image and reports PSNR and SSIM.
* :class:`LDMDiffusionStage` trains the preset's ``DiffusionModelUNet`` on latents that the frozen
  autoencoder (``$.init.autoencoder``) encodes on the fly (``encode_stage_2_inputs``, as MONAI's
  ``LatentDiffusionInferer`` in the bundles; nothing is pre-encoded), target the noise (v for v_prediction
  presets), loss MSE (the bundles' ``torch.nn.MSELoss``). The scale factor is 1 / std of the latents of
  ``$.diffusion.scale_factor_batches`` batches per process, all-reduced under torchrun, and saved in the
  checkpoint with where it came from.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn

from maisi.config.train_config import TrainConfig
from maisi.distributed import Ranks
from maisi.errors import InputError
from maisi.families.ldm import LDMPreset, build_ldm_network
from maisi.families.ldm_models import load_ldm_network
from maisi.families.networks import RuntimeOptions
from maisi.sampling import make_scheduler
from maisi.training.autoencoder import AutoencoderStage
from maisi.training.ct_data import read_stage_volumes
from maisi.training.diffusion import LatentDiffusionStage, inverse_std
from maisi.training.ldm_data import (
    CropDraw,
    Entries,
    ImageSteps,
    LDMDataset,
    LDMVolumes,
    centre_crop,
    check_ldm_images,
    crop_size,
    view_2d,
)
from maisi.training.loop import step_seed

log = logging.getLogger(__name__)
SCALE_SEED_OFFSET = 1_000_000  # the scale-factor batches: draws of their own, not any training step's


def _read_volumes(
    config: TrainConfig,
    preset: LDMPreset,
    dataset: LDMDataset,
    train: Entries,
    val: Entries,
    patch: tuple[int, ...],
    ranks: Ranks,
    stage: str,
) -> tuple[LDMVolumes, LDMVolumes]:
    steps = ImageSteps.of(preset, config.ldm, dataset.channel)
    loader = config.loader

    def hold(items: list[dict], min_size: tuple[int, int, int] | None, rate: float) -> LDMVolumes:
        return LDMVolumes(items, steps, crop_size(patch), rate, loader.num_workers, ranks.is_main)

    volumes = read_stage_volumes(
        train,
        val,
        lambda entries, what: check_ldm_images(entries, dataset.root, what),
        hold,
        crop_size(patch),
        loader.cache_rate,
        ranks,
        stage,
        f"the {stage} stage has no training images in {dataset.path}",
    )
    channel = f", channel '{dataset.channel_name}' ({dataset.channel})" if dataset.channel_name else ""
    log.info(
        "%s: %d training and %d validation images from %s%s; %s %s, intensities: percentiles %s -> [0, 1]%s",
        stage,
        len(volumes[0]),
        len(volumes[1]),
        dataset.path,
        channel,
        "axial slices" if len(patch) == 2 else "patches",
        list(patch),
        list(steps.percentiles),
        f", resampled to {list(steps.spacing)} mm" if steps.spacing else "",
    )
    return volumes


class LDMAutoencoderStage(AutoencoderStage):
    """Train (or finetune, ``$.init.autoencoder``) a plain-LDM preset's ``AutoencoderKL``."""

    patch_key = "$.ldm.autoencoder_patch"

    def __init__(
        self,
        config: TrainConfig,
        preset: LDMPreset,
        dataset: LDMDataset,
        train: Entries,
        val: Entries,
        device: torch.device,
        ranks: Ranks | None = None,
    ):
        self.dataset = dataset
        self.spatial_dims = preset.spatial_dims
        super().__init__(config, preset, dataset.root, train, val, device, ranks)  # type: ignore[arg-type]

    def training_patch(self) -> tuple[int, ...]:
        patch = self.config.ldm.autoencoder_patch
        return tuple(int(p) for p in patch) if patch else self.preset.output_shape

    def _read_images(self, root: Path, train: Entries, val: Entries, ranks: Ranks):  # type: ignore[override]
        return _read_volumes(self.config, self.preset, self.dataset, train, val, self.patch, ranks, self.name)

    def build_model(self, runtime: RuntimeOptions) -> nn.Module:
        if self.config.init.autoencoder:
            return load_ldm_network(self.preset, "autoencoder", self.config.init.autoencoder)[0]
        return build_ldm_network(self.preset, "autoencoder")

    def log_data(self) -> None:
        log.info("autoencoder: %s loss, preset '%s'", self.settings.recon_loss.upper(), self.preset.name)

    def batch_draw(self) -> CropDraw:  # type: ignore[override]
        """``$.batch_size`` crops (N, 1, *patch) per step."""
        return CropDraw(self.volumes, self.config.batch_size, self.patch, self.config.ldm.flip_prob)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """PSNR and SSIM (data range 1) of the ``z_mu`` reconstructions of each held-out image's mid slice
        (2D) or centre patch (3D); the first one's images."""
        if not len(self.val_volumes):
            return {}, {}
        was_training = model.training
        model.eval()
        psnr, ssim, images = PSNRMetric(max_val=1.0), [], {}
        for i in range(len(self.val_volumes)):
            x = centre_crop(self.val_volumes[i], self.patch)[None].to(self.device)
            recon = model.reconstruct(x).float().clamp(0, 1)
            psnr(recon, x)
            win = min(11, *[s - (1 - s % 2) for s in x.shape[2:]])  # odd, within the image
            ssim.append(float(SSIMMetric(self.spatial_dims, data_range=1.0, win_size=win)(recon, x).mean()))
            if i == 0:
                images = {"input": view_2d(x[0, 0]), "reconstruction": view_2d(recon[0, 0])}
        model.train(was_training)
        return {"psnr": float(psnr.aggregate().item()), "ssim": float(np.mean(ssim))}, images


class EncodedImages:
    """Validation images encoded by the frozen autoencoder (posterior mean), as the ``LatentCases`` interface
    that :func:`maisi.training.diffusion.validation_loss` reads."""

    def __init__(self, volumes: LDMVolumes, patch: tuple[int, ...], autoencoder: nn.Module):
        self.volumes, self.patch, self.autoencoder = volumes, patch, autoencoder

    def __len__(self) -> int:
        return len(self.volumes)

    @torch.no_grad()
    def batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        x = torch.stack([centre_crop(self.volumes[i], self.patch) for i in indices]).to(device)
        return {"latents": self.autoencoder.encode(x)[0].float()}


class LDMDiffusionStage(LatentDiffusionStage):
    """Train (or finetune) a plain-LDM preset's ``DiffusionModelUNet`` on latents encoded on the fly."""

    name = "diffusion"
    export_name = "diffusion_unet.pt"
    export_part = "diffusion_unet"
    objective = "mse"

    def __init__(
        self,
        config: TrainConfig,
        preset: LDMPreset,
        dataset: LDMDataset,
        train: Entries,
        val: Entries,
        ranks: Ranks,
        device: torch.device,
    ):
        """Read the images, load the frozen autoencoder, build the UNet, find the scale factor.

        Raises:
            InputError: no ``$.init.autoencoder``, or bad images (all listed).
            CheckpointError: an autoencoder or UNet checkpoint that does not fit the preset.
        """
        self.config, self.preset, self.device = config, preset, device
        if not config.init.autoencoder:
            raise InputError(
                "$.init.autoencoder: the diffusion stage of a plain-LDM preset encodes its images with the "
                "trained autoencoder (python -m maisi.train autoencoder writes <output_dir>/autoencoder.pt); "
                "give its path"
            )
        self.patch = preset.output_shape
        self.volumes, val_volumes = _read_volumes(
            config, preset, dataset, train, val, self.patch, ranks, self.name
        )
        self.autoencoder = load_ldm_network(preset, "autoencoder", config.init.autoencoder)[0].to(device)
        self.autoencoder.requires_grad_(False)
        self.train = None  # the latents are encoded per step: see train_loss
        self.val = EncodedImages(val_volumes, self.patch, self.autoencoder) if len(val_volumes) else None
        from_init = None
        if config.init.diffusion_unet:
            self.model, weights = load_ldm_network(preset, "diffusion_unet", config.init.diffusion_unet)
            from_init = weights.scale_factor
        else:
            self.model = build_ldm_network(preset, "diffusion_unet")
        # the preset's prediction type: the noise (epsilon) or MONAI's get_velocity target (v_prediction)
        schedule = replace(preset.schedule, prediction_type=preset.prediction_type)
        self.scheduler = make_scheduler(schedule, "ddpm")
        dc = config.diffusion
        if dc.scale_factor:
            self.scale_factor = float(dc.scale_factor)
            self.scale_factor_source = "$.diffusion.scale_factor of the training config"
        elif from_init:
            self.scale_factor = float(from_init)
            self.scale_factor_source = f"the initial UNet {config.init.diffusion_unet}"
        else:
            self.scale_factor = self._estimate_scale(dc.scale_factor_batches, ranks)

    def _estimate_scale(self, batches: int, ranks: Ranks) -> float:
        """1 / std of the autoencoder's latents (sampled, as trained on) of ``batches`` batches per process,
        drawn from seeds of their own; all-reduced across processes."""
        draw = self.batch_draw()

        def latents():
            for b in range(batches):
                seed = step_seed(self.config.seed + SCALE_SEED_OFFSET, b, ranks.rank)
                generator = torch.Generator().manual_seed(seed)
                torch.manual_seed(seed)  # the posterior sample
                yield self.encode(draw(generator))

        scale, count = inverse_std(latents(), ranks, self.device)
        processes = f" x {ranks.world_size} processes" if ranks.world_size > 1 else ""
        self.scale_factor_source = (
            f"1/std of {count} latent values: {batches} batches of {self.config.batch_size} training "
            f"{'slices' if self.preset.spatial_dims == 2 else 'patches'}{processes} encoded by "
            f"{self.config.init.autoencoder}"
        )
        log.info("scale_factor = %.5f (%s)", scale, self.scale_factor_source)
        return scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, *S) images -> (N, C, *S/f) latents sampled from the frozen autoencoder's posterior."""
        return self.autoencoder.encode_stage_2_inputs(images.to(self.device)).float()

    def batch_draw(self) -> CropDraw:
        return CropDraw(self.volumes, self.config.batch_size, self.patch)

    def unet_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {}

    def train_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        loss, _, _ = self.loss(model, {"latents": self.encode(batch)})
        return {"loss": loss}
