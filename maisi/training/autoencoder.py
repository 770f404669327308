"""Autoencoder stage: train or finetune MAISI's VAE (``AutoencoderKlMaisi``) on random CT patches.

Loss, as MAISI::

    recon (L1 or L2) + kl_weight * KL + perceptual_weight * perceptual + adversarial_weight * generator_adv

* **KL**: ``0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)`` over the latent voxels, mean over the batch.
* **Perceptual**: MONAI's ``PerceptualLoss`` with the network's weights read from a *local* file
  (``$.autoencoder.perceptual_weights``); nothing is ever downloaded. The network type is recognised from the
  file (see :func:`build_perceptual_loss`); without a file the term is off and the log says so.
* **Adversarial**: MONAI's ``PatchDiscriminator`` with ``PatchAdversarialLoss`` (least squares), switched on
  after ``adversarial_warmup_steps``; the discriminator has its own AdamW and is updated in ``after_step`` on
  the batch the generator just saw. Its weights and optimiser state are part of the resumable state.

Images are read and held as ``$.loader.cache_rate`` says (:mod:`maisi.training.ct_data`); under torchrun each
process draws from, and holds, its own share of the training images. A step's patches are drawn with the
generator the loop seeds from (seed, step, rank), in a DataLoader worker or in the training process, with the
same draws as before workers existed, so a resumed run repeats the uninterrupted one exactly.

Validation reconstructs every held-out volume from ``z_mu`` (no sampling) as the pipeline does (whole volume,
exact tiles; :func:`maisi.vae.codec.round_trip`) or by MAISI's sliding windows (``$.autoencoder.val_method``),
and reports PSNR and SSIM on the [0, 1] intensity scale.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.inferers import SlidingWindowInferer
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import PatchDiscriminator
from monai.utils import convert_to_tensor
from torch import nn

from maisi.checkpoints import load_network, save_checkpoint
from maisi.config.train_config import TrainConfig
from maisi.distributed import Ranks
from maisi.errors import CheckpointError, InputError, TrainingDiverged
from maisi.families.ct import Preset
from maisi.families.networks import RuntimeOptions, build_network
from maisi.training.ct_data import CTVolumes, PatchDraw, check_images, read_stage_volumes
from maisi.training.perceptual import build_perceptual_loss
from maisi.vae.codec import round_trip

log = logging.getLogger(__name__)

VAL_OVERLAP = 0.25


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent channels and voxels, mean over the batch (MAISI's)."""
    mu, sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1, dim=list(range(1, mu.ndim)))
    return kl.mean()


def axial_mid_slice(volume: torch.Tensor) -> np.ndarray:
    """Axial mid-slice of an (X, Y, Z) volume in [0, 1], oriented for viewing (anterior up), float32 2D."""
    s = volume[:, :, volume.shape[2] // 2].float().clamp(0, 1).cpu().numpy().T[::-1]
    return np.ascontiguousarray(s, dtype=np.float32)


DISCRIMINATOR_MIN_PATCH = 24


def discriminator_fits(patch: tuple[int, ...]) -> bool:
    """Whether MONAI's 3-layer PatchDiscriminator gives at least one logit per axis for ``patch``.

    Its convolutions (kernel 4, padding 1) have strides 2, 2, 2, 1, 1; instance norm needs more than one
    voxel, which every patch that passes this has.
    """
    for size in patch:
        for stride in (2, 2, 2, 1, 1):
            size = (size - 2) // stride + 1
        if size < 1:
            return False
    return True


ENCODER_PARTS = ("encoder", "quant_conv_mu", "quant_conv_log_sigma")


def freeze_encoder(model: nn.Module) -> None:
    """Exclude everything up to the latent (encoder and the mu / sigma convolutions) from training.

    The latent space then stays bit-identical, so a diffusion UNet and ControlNet trained on its latents stay
    valid while the decoder improves; the loop's optimiser takes only parameters that require gradients.
    """
    for name in ENCODER_PARTS:
        getattr(model, name).requires_grad_(False)


def _in_ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AutoencoderStage:
    """Train (or finetune, ``$.init.autoencoder``) the VAE on random patches of CT images."""

    name = "autoencoder"
    spatial_dims = 3  # of the images, the discriminator and the perceptual loss
    patch_key = "$.autoencoder.patch_size"  # the config key of the training crop, for messages

    def __init__(
        self,
        config: TrainConfig,
        preset: Preset,
        root: Path,
        train: list[tuple[int, dict[str, Any]]],
        val: list[tuple[int, dict[str, Any]]],
        device: torch.device,
        ranks: Ranks | None = None,
    ):
        """Check every CT, read those to hold, then build the VAE, the perceptual loss and the discriminator.

        Args:
            config: the train config (``config.autoencoder`` holds this stage's settings).
            preset: the network preset.
            root: folder the datalist's ``image`` paths are relative to.
            train: ``(datalist index, entry)`` of the training cases (CT images).
            val: the same for the validation cases (may be empty).
            device: where the networks run.
            ranks: this process among torchrun's (None: the only one).

        Raises:
            InputError: missing or unreadable images, or held images with NaN/inf voxels (all listed at
                once), or a missing package.
            CheckpointError: init or perceptual weights that do not fit.
        """
        self.config, self.preset, self.device = config, preset, device
        ac = self.settings = config.autoencoder
        self.patch = self.training_patch()
        self.volumes, self.val_volumes = self._read_images(root, train, val, ranks or Ranks())
        if ac.train_decoder_only and not config.init.autoencoder:
            raise InputError(
                "$.autoencoder.train_decoder_only: needs $.init.autoencoder (the VAE whose encoder "
                "and latent space are kept)"
            )
        runtime = RuntimeOptions()  # weights-neutral memory/speed options all off: CPU-safe, deterministic
        self.step = 0  # steps completed; the adversarial term starts at adversarial_warmup_steps
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        with torch.random.fork_rng(devices=[]):  # seeded initial weights: equal runs start equal
            torch.manual_seed(config.seed)
            self.model = self.build_model(runtime)
            if ac.train_decoder_only:
                freeze_encoder(self.model)
            self.perceptual = self._build_perceptual()
            self.discriminator, self.d_optimizer = self._build_discriminator()
        self._d_step = self.discriminator
        if self.discriminator is not None and _in_ddp():
            self._d_step = torch.nn.parallel.DistributedDataParallel(self.discriminator)
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
        self.log_data()

    def training_patch(self) -> tuple[int, ...]:
        """The training crop in voxels: ``$.autoencoder.patch_size``."""
        px, py, pz = (int(p) for p in self.settings.patch_size)
        return (px, py, pz)

    def build_model(self, runtime: RuntimeOptions) -> nn.Module:
        """The VAE of the preset, from ``$.init.autoencoder`` when given."""
        if self.config.init.autoencoder:
            return load_network(self.preset, "autoencoder", self.config.init.autoencoder, runtime)[0]
        return build_network(self.preset, "autoencoder", runtime)

    def log_data(self) -> None:
        ac = self.settings
        log.info(
            "autoencoder: %d training and %d validation volumes (%d and %d held in memory), patch %s "
            "(at least %.0f%% above -950 HU), %s loss",
            len(self.volumes),
            len(self.val_volumes),
            self.volumes.held,
            self.val_volumes.held,
            list(self.patch),
            100 * ac.min_foreground,
            ac.recon_loss.upper(),
        )

    def _read_images(
        self,
        root: Path,
        train: list[tuple[int, dict[str, Any]]],
        val: list[tuple[int, dict[str, Any]]],
        ranks: Ranks,
    ) -> tuple[CTVolumes, CTVolumes]:
        """Check every image's header, then read the images to hold: this process's share of the training
        images (under torchrun), the validation images on the validating process only. Problems are listed at
        once."""
        loader = self.config.loader

        def hold(items: list[dict], min_size: tuple[int, int, int] | None, rate: float) -> CTVolumes:
            return CTVolumes(items, min_size, rate, loader.num_workers, ranks.is_main)

        return read_stage_volumes(
            train,
            val,
            lambda entries, what: check_images(entries, root, what),
            hold,
            self.patch,
            loader.cache_rate,
            ranks,
            "autoencoder",
            "the autoencoder stage has no training images",
        )

    def _build_perceptual(self) -> nn.Module | None:
        ac = self.settings
        if not ac.perceptual_weights:
            log.info("perceptual loss off: no local weights given ($.autoencoder.perceptual_weights)")
            return None
        if ac.perceptual_weight == 0:
            log.info(
                "perceptual loss off: $.autoencoder.perceptual_weight is 0 (the weights file is not read)"
            )
            return None
        loss, kind = build_perceptual_loss(ac.perceptual_weights, spatial_dims=self.spatial_dims)
        log.info(
            "perceptual loss on: %s network (%s) from %s, weight %g",
            kind,
            "2.5D" if loss.is_fake_3d else f"{self.spatial_dims}D",
            ac.perceptual_weights,
            ac.perceptual_weight,
        )
        return loss.to(self.device).eval()

    def _build_discriminator(self) -> tuple[nn.Module | None, torch.optim.Optimizer | None]:
        ac = self.settings
        if ac.adversarial_weight == 0:
            log.info("adversarial loss off: $.autoencoder.adversarial_weight is 0")
            return None, None
        if not discriminator_fits(self.patch):
            raise InputError(
                f"{self.patch_key}: {list(self.patch)} is too small for the PatchDiscriminator "
                f"(3 layers): it needs at least {DISCRIMINATOR_MIN_PATCH} voxels per axis; use a larger "
                "patch or set $.autoencoder.adversarial_weight to 0"
            )
        ae = self.preset.autoencoder  # MAISI's VAE says num_channels, MONAI's AutoencoderKL channels
        channels = min(32, int(ae.get("num_channels", ae.get("channels"))[0]))
        disc = PatchDiscriminator(
            spatial_dims=self.spatial_dims,
            num_layers_d=3,
            channels=channels,
            in_channels=1,
            out_channels=1,
            norm="INSTANCE",
        ).to(self.device)
        opt = self.config.optimizer
        d_opt = torch.optim.AdamW(
            disc.parameters(), lr=ac.discriminator_lr, betas=opt.betas, weight_decay=opt.weight_decay
        )
        log.info(
            "adversarial loss on: PatchDiscriminator (%d channels), weight %g, from step %d",
            channels,
            ac.adversarial_weight,
            ac.adversarial_warmup_steps,
        )
        return disc, d_opt

    @property
    def adversarial_active(self) -> bool:
        return self.discriminator is not None and self.step >= self.settings.adversarial_warmup_steps

    def batch_draw(self) -> PatchDraw:
        """Draws ``$.batch_size`` random patches (N, 1, *patch_size) per step."""
        return PatchDraw(self.volumes, self.config.batch_size, self.patch, self.settings.min_foreground)

    def train_loss(self, model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms on the step's patches (N, 1, *patch_size); ``"loss"`` is their weighted sum."""
        ac = self.settings
        x = batch.to(self.device)
        recon, z_mu, z_sigma = model(x)
        recon = recon.float()
        error = recon - x
        terms = {
            "recon": error.abs().mean() if ac.recon_loss == "l1" else error.pow(2).mean(),
            "kl": kl_divergence(z_mu, z_sigma),
        }
        loss = terms["recon"] + ac.kl_weight * terms["kl"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(recon, x)
            loss = loss + ac.perceptual_weight * terms["perceptual"]
        if self.adversarial_active:
            assert self.discriminator is not None
            self.discriminator.requires_grad_(False)  # the generator's term moves the VAE only
            logits = self.discriminator(recon.contiguous())[-1]
            self.discriminator.requires_grad_(True)
            terms["generator_adv"] = self.adversarial_loss(
                logits, target_is_real=True, for_discriminator=False
            )
            loss = loss + ac.adversarial_weight * terms["generator_adv"]
        if self.discriminator is not None:
            self._last = (x.detach(), recon.detach())
        terms["loss"] = loss
        return terms

    def after_step(self, step: int) -> dict[str, float]:
        """One discriminator update on the generator's last batch (after the warm-up)."""
        active, last = self.adversarial_active, self._last
        self.step, self._last = step + 1, None
        if not active or last is None:
            return {}
        assert self.d_optimizer is not None
        x, recon = last
        self.d_optimizer.zero_grad(set_to_none=True)
        fake = self._d_step(recon.float().contiguous())[-1]
        real = self._d_step(x.contiguous())[-1]
        d_loss = 0.5 * (
            self.adversarial_loss(fake, target_is_real=False, for_discriminator=True)
            + self.adversarial_loss(real, target_is_real=True, for_discriminator=True)
        )
        if not torch.isfinite(d_loss):
            raise TrainingDiverged(
                f"step {step + 1}: discriminator loss is {d_loss.item()}; stopping (lower the "
                "learning rates ($.autoencoder.discriminator_lr) or check the data)"
            )
        d_loss.backward()
        self.d_optimizer.step()
        return {"discriminator": float(d_loss.detach())}

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, volume: torch.Tensor) -> torch.Tensor:
        """Deterministic (``z_mu``) reconstruction of a (1, X, Y, Z) volume -> (1, X, Y, Z) on CPU, by
        ``$.autoencoder.val_method``: the pipeline's exact whole-volume round trip, or MONAI sliding
        windows."""
        ac = self.settings
        if ac.val_method == "tiled":
            image = volume[None].to(self.device)
            return round_trip(model, image, self.preset.vae_factor, ac.val_memory_budget_mb)[0]
        inferer = SlidingWindowInferer(
            roi_size=tuple(ac.val_roi_size),
            sw_batch_size=1,
            overlap=VAL_OVERLAP,
            mode="gaussian",
            sw_device=self.device,
            device=torch.device("cpu"),
        )
        out = inferer(volume[None], lambda tile: model.reconstruct(tile).float())
        return convert_to_tensor(out, track_meta=False)[0].float()

    @torch.no_grad()
    def validate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """PSNR and SSIM (data range 1) of the held-out volumes' reconstructions; mid-slices of the first."""
        if not len(self.val_volumes):
            return {}, {}
        was_training = model.training
        model.eval()
        psnr, ssim = PSNRMetric(max_val=1.0), []
        images: dict[str, np.ndarray] = {}
        for i in range(len(self.val_volumes)):
            volume = self.val_volumes[i]
            recon = self.reconstruct(model, volume).clamp(0, 1)
            psnr(recon[None], volume[None])
            win = min(11, *[s - (1 - s % 2) for s in volume.shape[1:]])  # odd, within the volume
            metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=win)
            ssim.append(float(metric(recon[None], volume[None]).mean()))
            if i == 0:
                images = {"input": axial_mid_slice(volume[0]), "reconstruction": axial_mid_slice(recon[0])}
        model.train(was_training)
        return {"psnr": float(psnr.aggregate().item()), "ssim": float(np.mean(ssim))}, images

    def export(self, model: nn.Module, folder: Path, config_sha256: str) -> list[Path]:
        return [
            save_checkpoint(
                Path(folder) / "autoencoder.pt",
                model,
                self.preset,
                "autoencoder",
                config_sha256=config_sha256,
            )
        ]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step}
        if self.discriminator is not None and self.d_optimizer is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["discriminator_optimizer"] = self.d_optimizer.state_dict()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if self.discriminator is not None and self.d_optimizer is not None:
            if "discriminator" not in state:
                raise CheckpointError(
                    "the training state holds no discriminator (saved without the adversarial loss)"
                )
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
