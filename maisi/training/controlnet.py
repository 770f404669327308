"""ControlNet stage: a frozen diffusion UNet, a trainable ControlNet fed the bit-encoded label mask.

The ControlNet starts from the UNet's matching weights (MONAI ``copy_model_state``; its zero-initialised
output convolutions make it a no-op at first) or from a given ControlNet checkpoint. ``weighted_loss``
multiplies the loss on latent voxels covered by ``weighted_loss_label``; the label is max-pooled to the
latent grid, so a lesion of a single image voxel still marks its latent voxel.

With ``region_contrastive_weight`` > 0, MAISI v2's region-contrastive loss (:mod:`maisi.training.contrastive`)
is added: the tumour-free mask (``remove_tumors``, hosts from the label dictionary) is made in the batch
draw, in the loader's workers, and both masks go through the networks in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.utils import copy_model_state

from maisi.checkpoints import load_network, save_checkpoint
from maisi.conditioning import binarize_labels
from maisi.config.train_config import ControlNetStageConfig, TrainConfig
from maisi.errors import CheckpointError, InputError
from maisi.families.ct import Preset
from maisi.families.networks import RuntimeOptions, build_network
from maisi.labels import is_dummy, load_label_dict
from maisi.masks.tumour_free import remove_tumors, tumour_hosts
from maisi.training.contrastive import contrast_regions, region_contrastive_terms
from maisi.training.diffusion import (
    NoisedLatents,
    add_training_noise,
    predict,
    training_scheduler,
    validation_loss,
    weighted_l1,
)
from maisi.training.latent_data import CaseDraw, LatentCases

TUMOUR_FREE = "labels_tumour_free"  # batch key of the tumour-free (N, 1, X, Y, Z) labels


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


def check_host_rules(cfg: ControlNetStageConfig, label_dict: dict[str, int]) -> None:
    """With the region-contrastive loss on, every ``weighted_loss_label`` class must have a host rule: the
    tumour-free mask replaces it by its host, so that its region is the one the loss contrasts.

    Raises:
        InputError: naming the key and the classes without a host rule (or a tumour-like class of the
            dictionary without one, which ``remove_tumors`` cannot handle either).
    """
    if cfg.region_contrastive_weight <= 0:
        return
    where = cfg.label_dict or "MAISI's"
    try:
        hosts = tumour_hosts(label_dict)
    except InputError as e:
        raise InputError(
            f"$.controlnet.label_dict ({where}), needed by $.controlnet.region_contrastive_weight: {e}"
        ) from None
    names = {i: n for n, i in label_dict.items()}
    missing = [f"{i} ('{names[i]}')" for i in cfg.weighted_loss_label if i not in hosts]
    if missing:
        raise InputError(
            f"$.controlnet.weighted_loss_label: class {', '.join(missing)} has no host rule in the label "
            f"dictionary ({where}), so the tumour-free mask of $.controlnet.region_contrastive_weight would "
            "keep it; declare its host organ (python -m maisi.labels add --host) or set "
            "region_contrastive_weight to 0"
        )


@dataclass(frozen=True)
class TumourFreeDraw:
    """A :class:`CaseDraw` plus the tumour-free labels of its cases (``remove_tumors``, CPU): the host
    votes run in the loader's workers, ahead of the step."""

    cases: CaseDraw
    label_dict: dict[str, int]

    def __call__(self, generator: torch.Generator) -> dict[str, Any]:
        batch = self.cases(generator)
        batch[TUMOUR_FREE] = remove_tumors(batch["labels"], self.label_dict)
        return batch


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
        check_host_rules(cfg, label_dict)
        self.label_dict = label_dict
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

    def _output(
        self,
        controlnet: torch.nn.Module,
        noised: NoisedLatents,
        unet_inputs: dict[str, torch.Tensor],
        control: torch.Tensor,
    ) -> torch.Tensor:
        """(N, C, x, y, z) output of the frozen UNet with the ControlNet's residuals for ``control``."""
        class_labels = unet_inputs.get("class_labels")

        def residuals(noisy: torch.Tensor, timesteps: torch.Tensor) -> dict[str, Any]:
            down, mid = controlnet(
                x=noisy,
                timesteps=timesteps,
                controlnet_cond=control,
                conditioning_scale=self.config.controlnet.conditioning_scale,
                class_labels=class_labels,
            )
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return predict(self.unet, noised, unet_inputs, residuals)

    def _loss(
        self, controlnet: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Loss terms (``loss``: the one optimised), the output with the real mask and the target."""
        cfg = self.config.controlnet
        labels = batch["labels"]
        weights = lesion_weights(labels, cfg.weighted_loss_label, cfg.weighted_loss, self.preset.vae_factor)
        noised = add_training_noise(self.scheduler, batch["latents"] * self.scale_factor, generator)
        inputs = batch["unet_inputs"]
        if cfg.region_contrastive_weight <= 0:
            output = self._output(controlnet, noised, inputs, batch["control"])
            return {"loss": weighted_l1(output, noised.target, weights)}, output, noised.target
        free = batch.get(TUMOUR_FREE)
        free = remove_tumors(labels, self.label_dict) if free is None else free
        if torch.equal(free, labels):  # no tumour in the batch: the second pass would repeat the first
            output = output_free = self._output(controlnet, noised, inputs, batch["control"])
        else:  # both masks in one batched call (one forward of the possibly DDP-wrapped ControlNet)
            n = labels.shape[0]
            both = NoisedLatents(
                *(torch.cat([t, t]) for t in (noised.noisy, noised.timesteps, noised.target))
            )
            doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
            control = torch.cat([batch["control"], binarize_labels(free)])
            output, output_free = self._output(controlnet, both, doubled, control).split(n)
        l1 = weighted_l1(output, noised.target, weights)
        roi, background = contrast_regions(labels, free, self.preset.vae_factor)
        foreground, outside = region_contrastive_terms(
            output, output_free, noised.target, roi, background, cfg.region_contrastive_delta
        )
        terms = {
            "loss": l1 + cfg.region_contrastive_weight * (foreground + outside),
            "l1": l1,
            "contrastive_foreground": foreground,
            "contrastive_background": outside,
        }
        return terms, output, noised.target

    def batch_draw(self) -> CaseDraw | TumourFreeDraw:
        cases = CaseDraw(self.train, self.config.batch_size)
        if self.config.controlnet.region_contrastive_weight <= 0:
            return cases
        return TumourFreeDraw(cases, self.label_dict)

    def train_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        on_device = self.train.to_device(batch, self.device)
        if TUMOUR_FREE in batch:
            on_device[TUMOUR_FREE] = batch[TUMOUR_FREE].to(self.device)
        return self._loss(model, on_device)[0]

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def validate(self, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        model.eval()

        def loss_fn(batch: dict[str, Any], generator: torch.Generator):
            terms, output, target = self._loss(model, batch, generator)
            return terms["loss"], output, target

        return validation_loss(self.val, self.device, loss_fn)

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
