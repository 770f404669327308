"""mask_diffusion stage: train or finetune the size-conditioned mask UNet of a mask preset on mask latents.

The mask UNet (MONAI ``DiffusionModelUNet`` with cross-attention, as MAISI's released
``mask_generation_diffusion_unet.pt``) learns DDPM's noise (epsilon) with the L1 loss the CT diffusion stage
uses (:func:`maisi.training.diffusion.denoising_loss`), conditioned on the case's 10-slot size vector as the
cross-attention context of shape (N, 1, 10). Latents come from ``maisi.encode`` with kind ``"mask"``; they are
multiplied by ``scale_factor`` (1 / std of the training latents, estimated as the CT diffusion stage does, or
the init UNet's, or ``$.mask_diffusion.scale_factor``), which is saved with the UNet.

Every case is checked before the first step (all problems listed at once): the latent exists, is finite and
matches its sidecar (shape, checksum), the sidecar says kind ``"mask"``, the channels are the preset's, and
the case has an ``anatomy_size`` (datalist entry, else sidecar) of 10 values each in [0, 1] or -1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maisi.config.train_config import TrainConfig
from maisi.distributed import Ranks
from maisi.errors import InputError, VolumeError
from maisi.families.mask import NUM_SIZE_SLOTS, MaskPreset
from maisi.families.networks import RuntimeOptions
from maisi.masks.networks import CHECKPOINT_PART, build_mask_network, load_mask_network
from maisi.sampling import make_scheduler
from maisi.training.diffusion import LatentDiffusionStage, resolve_scale_factor
from maisi.training.latent_data import (
    check_latent_file,
    checked_cases,
    load_latent,
    read_case_sidecar,
    require_one_shape,
)

log = logging.getLogger(__name__)
EXPORT_NAME = "mask_diffusion_unet.pt"
SIZES_HINT = "add it with python -m maisi.masks sizes, then encode again"


def size_vector_problems(value: Any, where: str) -> list[str]:
    """Why ``value`` is not a size vector (10 numbers, each in [0, 1] or exactly -1); [] when it is one."""
    if not isinstance(value, (list, tuple)) or len(value) != NUM_SIZE_SLOTS:
        return [f"{where}: {value!r} is not a list of {NUM_SIZE_SLOTS} sizes"]
    problems = []
    for slot, size in enumerate(value):
        ok = isinstance(size, (int, float)) and not isinstance(size, bool) and math.isfinite(size)
        if not ok or not (0.0 <= size <= 1.0 or size == -1):
            problems.append(f"{where}[{slot}]: {size!r} is neither a size in [0, 1] nor -1 (absent)")
    return problems


@dataclass(frozen=True)
class MaskLatentCase:
    latent: Path
    sizes: tuple[float, ...]  # the 10-slot size vector
    shape: tuple[int, ...]  # (C, x, y, z)


def _check_case(i: int, entry: dict[str, Any], root: Path, preset: MaskPreset) -> tuple[Any, list[str]]:
    where = f"$.training[{i}]"
    latent = root / entry["image"]
    sidecar, problems = read_case_sidecar(where, latent, "mask latent")
    if sidecar is None:
        return None, problems
    if sidecar.get("kind") != "mask":
        return None, [
            f"{where}.image: {latent} is not a mask latent (its sidecar says kind "
            f"{sidecar.get('kind', 'image')!r}); encode the masks with maisi.encode kind 'mask'"
        ]
    shape, problems = check_latent_file(where, latent, sidecar)
    if shape is None:
        return None, problems
    channels = int(preset.latent_shape[0])
    if shape[0] != channels:
        problems.append(f"{where}: {shape[0]} latent channels, mask preset '{preset.name}' has {channels}")
    multiple = 2 ** (len(preset.diffusion_unet["channels"]) - 1)
    if any(s % multiple for s in shape[1:]):
        problems.append(
            f"{where}: latent grid {list(shape[1:])} is not a multiple of {multiple} per axis, as the mask "
            f"UNet of '{preset.name}' needs (encode with pad_to_multiple)"
        )
    sizes = entry.get("anatomy_size", sidecar.get("anatomy_size"))
    if sizes is None:
        problems.append(
            f"{where}.anatomy_size: missing in the entry and the sidecar (the mask UNet is conditioned on "
            f"the {NUM_SIZE_SLOTS}-slot size vector; {SIZES_HINT})"
        )
    else:
        problems += size_vector_problems(sizes, f"{where}.anatomy_size")
    if problems:
        return None, problems
    return MaskLatentCase(latent, tuple(float(s) for s in sizes), shape), []


class MaskLatentCases:
    """The training (or validation) cases of a mask-latent datalist, checked up front."""

    def __init__(self, entries: list[tuple[int, dict[str, Any]]], root: Path, preset: MaskPreset):
        self.cases: list[MaskLatentCase] = checked_cases(
            entries, lambda i, entry: _check_case(i, entry, root, preset), "mask latent"
        )

    def __len__(self) -> int:
        return len(self.cases)

    def read(self, indices: list[int]) -> dict[str, Any]:
        """Stacked cases on the CPU: ``latents`` (N, C, x, y, z) and ``context`` (N, 1, 10) sizes.

        Raises:
            InputError: the cases differ in shape, or a latent turned non-finite since it was checked.
        """
        chosen = [self.cases[i] for i in indices]
        require_one_shape([c.shape for c in chosen], "mask latent")
        try:
            latents = torch.stack([torch.from_numpy(load_latent(c.latent)) for c in chosen])
        except VolumeError as e:
            raise InputError(str(e)) from None
        return {"latents": latents, "context": torch.tensor([[c.sizes] for c in chosen], dtype=torch.float32)}

    @staticmethod
    def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return {k: v.to(device) for k, v in batch.items()}

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        return self.to_device(self.read(indices), device)


@dataclass(frozen=True)
class MaskCaseDraw:
    """One step's batch: ``batch_size`` cases drawn uniformly (with replacement) with the generator given."""

    cases: MaskLatentCases
    batch_size: int

    def __call__(self, generator: torch.Generator) -> dict[str, Any]:
        indices = torch.randint(len(self.cases), (self.batch_size,), generator=generator).tolist()
        return self.cases.read(indices)


class MaskDiffusionStage(LatentDiffusionStage):
    """Train (or finetune, ``$.init.mask_diffusion_unet``) the mask UNet on mask latents with size vectors."""

    name = "mask_diffusion"
    export_name = EXPORT_NAME
    export_part = CHECKPOINT_PART["diffusion_unet"]

    def __init__(
        self,
        config: TrainConfig,
        preset: MaskPreset,
        train: MaskLatentCases,
        val: MaskLatentCases | None,
        ranks: Ranks,
        device: torch.device,
    ):
        self.config, self.preset, self.train, self.val, self.device = config, preset, train, val, device
        runtime = RuntimeOptions(use_flash_attention=False)
        from_init = None
        with torch.random.fork_rng(devices=[]):  # seeded initial weights: equal runs start equal
            torch.manual_seed(config.seed)
            if config.init.mask_diffusion_unet:
                path = config.init.mask_diffusion_unet
                self.model, weights = load_mask_network(preset, "diffusion_unet", path, runtime)
                from_init = weights.scale_factor
            else:
                self.model = build_mask_network(preset, "diffusion_unet", runtime)
        shapes = sorted({c.shape[1:] for c in train.cases})
        if any(list(s) != list(preset.latent_shape[1:]) for s in shapes):
            log.info(
                "mask latent grids %s; mask preset '%s' generates %s",
                [list(s) for s in shapes],
                preset.name,
                list(preset.latent_shape[1:]),
            )
        self.scheduler = make_scheduler(preset.schedule, "ddpm")
        md = config.mask_diffusion
        self.scale_factor = resolve_scale_factor(
            md.scale_factor,
            from_init,
            train,  # type: ignore[arg-type]
            md.scale_factor_batches,
            config.batch_size,
            ranks,
            device,
            "mask latents",
        )

    def batch_draw(self) -> MaskCaseDraw:
        return MaskCaseDraw(self.train, self.config.batch_size)

    def unet_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"context": batch["context"]}
