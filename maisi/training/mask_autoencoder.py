"""mask_autoencoder stage: train or finetune the mask VAE of a mask preset on random patches of label masks.

The mask VAE (MONAI ``AutoencoderKlMaisi`` with 8 inputs and 125 outputs, as MAISI's released
``mask_generation_autoencoder.pt``) reads the 8 bit-planes of a MAISI-id mask
(:func:`maisi.conditioning.binarize_labels`) and returns the logits of the 125 channels of
``maisi/resources/maisi_label_dict_124_to_132.json`` (channel -> MAISI id; the target of a voxel is the
channel of its id). Loss::

    DiceCELoss(softmax, one-hot target; dice_weight, ce_weight) + kl_weight * KL

Masks come from the datalist entries' ``label``. Each is read once, checked (integer labels, every id in the
table; all problems listed at once), resampled (nearest) to ``$.mask_autoencoder.spacing`` when it is set and
held as channel indices, up to ``$.loader.cache_rate`` as the CT
autoencoder stage holds its images. A step's patches are drawn with the generator the loop seeds from (seed,
step, rank), so a resumed run repeats the uninterrupted one exactly.

Validation reconstructs each held-out mask in non-overlapping windows (MONAI ``SlidingWindowInferer``, overlap
0, on the mask padded to whole windows) and takes the argmax inside each window, so the 125-channel logits of
a whole volume never exist; it reports the mean Dice over the foreground classes of the mask and the voxel
accuracy.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import DivisiblePad, Spacing, SpatialPad, Transform
from monai.utils import convert_to_tensor
from torch import nn

from maisi.checkpoints import save_checkpoint
from maisi.conditioning import binarize_labels
from maisi.config.train_config import TrainConfig
from maisi.data.io import read_mask
from maisi.distributed import Ranks
from maisi.errors import InputError
from maisi.families.mask import MaskPreset
from maisi.families.networks import RuntimeOptions
from maisi.masks.decode import CHANNEL_TO_ID_FILE, channel_to_id_table, channels_to_maisi_ids
from maisi.masks.networks import CHECKPOINT_PART, build_mask_network, load_mask_network
from maisi.training.autoencoder import kl_divergence
from maisi.training.ct_data import HeldVolumes, PatchDraw, check_headers, read_stage_volumes

log = logging.getLogger(__name__)

EXPORT_NAME = "mask_autoencoder.pt"


@functools.lru_cache(maxsize=1)
def channel_ids() -> np.ndarray:
    """(125,) int64: the MAISI id of each output channel of the mask VAE (the packaged table)."""
    return channel_to_id_table().numpy()


@functools.lru_cache(maxsize=1)
def id_channels() -> np.ndarray:
    """(256,) int16: the channel of each MAISI id 0..255, -1 for ids the mask VAE has no channel for."""
    lut = np.full(256, -1, dtype=np.int16)
    ids = channel_ids()
    lut[ids] = np.arange(len(ids), dtype=np.int16)
    return lut


def unknown_ids(mask: np.ndarray) -> list[int]:
    """The ids of an integer mask that have no channel in the 124 -> 132 table (sorted; [] when none)."""
    present = np.unique(mask)
    inside = (present >= 0) & (present < 256)
    known = np.zeros(present.shape, dtype=bool)
    known[inside] = id_channels()[present[inside]] >= 0
    return [int(v) for v in present[~known]]


def to_channels(mask: np.ndarray) -> np.ndarray:
    """MAISI-id mask -> uint8 channel indices (every id must be in the table: see :func:`unknown_ids`)."""
    return id_channels()[mask.astype(np.int64)].astype(np.uint8)


def unknown_ids_message(path: Path | str, ids: list[int]) -> str:
    more = f" (+{len(ids) - 8} more)" if len(ids) > 8 else ""
    return (
        f"{path} holds label id(s) {ids[:8]}{more} that the mask VAE has no channel for (its 125 channels "
        f"are the MAISI ids of maisi/resources/{CHANNEL_TO_ID_FILE}; kidney cysts 116/117 and the dummy "
        "slots are not among them): relabel those voxels, e.g. to their host organ with python -m "
        "maisi.labels remap --mapping YOUR_MAPPING.json, or leave the case out"
    )


def check_masks(
    entries: list[tuple[int, dict[str, Any]]], root: Path, what: str
) -> tuple[list[dict], list[str]]:
    """Headers of every entry's ``label`` (no voxels read): (items to load, problems)."""
    return check_headers(entries, root, what, "label", "the mask stages read each entry's label mask")


class LoadMaskChannelsd(Transform):
    """``{"label": path, "where": ...}`` -> ``{"label": (1, X, Y, Z) uint8 channel indices}`` padded with
    background (symmetric) to at least ``min_size``; or ``{"problem": message}`` (returned, not raised: raised
    in a worker it would arrive wrapped in the worker's traceback)."""

    def __init__(
        self, min_size: tuple[int, int, int] | None, spacing: tuple[float, float, float] | None = None
    ):
        self.pad = SpatialPad(min_size, method="symmetric", mode="constant") if min_size else None
        self.resample = Spacing(pixdim=spacing, mode="nearest", padding_mode="zeros") if spacing else None

    def __call__(self, item: dict[str, str]) -> dict[str, Any]:
        try:
            volume = read_mask(item["label"])
        except InputError as e:
            return {"problem": f"{item['where']}: {e}"}
        bad = unknown_ids(volume.array)
        if bad:
            return {"problem": f"{item['where']}: {unknown_ids_message(item['label'], bad)}"}
        x = torch.from_numpy(to_channels(volume.array))[None]
        if self.resample is not None:  # nearest on channel indices: every voxel keeps one of the mask's ids
            x = MetaTensor(x, affine=torch.as_tensor(volume.affine))
            x = convert_to_tensor(self.resample(x), track_meta=False).round().to(torch.uint8)
        if self.pad is not None:
            x = convert_to_tensor(self.pad(x), track_meta=False)
        return {"label": x.contiguous()}


class MaskVolumes(HeldVolumes):
    """Masks checked by :func:`check_masks` as (1, X, Y, Z) uint8 channel indices, by position; the first
    ``int(cache_rate * n)`` are read here and held, the others read on every access."""

    key = "label"
    what = "mask"

    def __init__(
        self,
        items: list[dict],
        min_size: tuple[int, int, int] | None,
        cache_rate: float,
        threads: int = 1,
        progress: bool = False,
        spacing: tuple[float, float, float] | None = None,
    ):
        super().__init__(items, LoadMaskChannelsd(min_size, spacing), cache_rate, threads, progress)


def dice_and_accuracy(target: torch.Tensor, predicted: torch.Tensor, classes: int) -> dict[str, float]:
    """Mean Dice over the foreground channels present in ``target`` and the voxel accuracy.

    Both are integer channel volumes of one shape; counted with one confusion matrix (classes x classes), so
    no one-hot volume is built.
    """
    t, p = target.reshape(-1).long(), predicted.reshape(-1).long()
    confusion = torch.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)
    hits = confusion.diagonal().double()
    in_target, in_pred = confusion.sum(1).double(), confusion.sum(0).double()
    present = torch.nonzero(in_target[1:]).flatten() + 1  # foreground channels of the reference
    dice = (2 * hits[present] / (in_target[present] + in_pred[present])).mean() if len(present) else None
    return {
        "dice": float(dice) if dice is not None else float("nan"),
        "accuracy": float(hits.sum() / max(1, t.numel())),
    }


def channel_slice(volume: torch.Tensor, classes: int) -> np.ndarray:
    """Axial mid-slice of an (X, Y, Z) channel volume scaled to [0, 1] for TensorBoard."""
    s = volume[:, :, volume.shape[2] // 2].float().cpu().numpy().T[::-1] / max(1, classes - 1)
    return np.ascontiguousarray(s, dtype=np.float32)


class MaskAutoencoderStage:
    """Train (or finetune, ``$.init.mask_autoencoder``) the mask VAE on random patches of label masks."""

    name = "mask_autoencoder"

    def __init__(
        self,
        config: TrainConfig,
        preset: MaskPreset,
        root: Path,
        train: list[tuple[int, dict[str, Any]]],
        val: list[tuple[int, dict[str, Any]]],
        device: torch.device,
        ranks: Ranks | None = None,
    ):
        """Check every mask, read those to hold, then build the mask VAE and the loss.

        Raises:
            InputError: missing or unreadable masks, or held masks with ids outside the table (all listed).
            CheckpointError: init weights that do not fit the preset.
        """
        self.config, self.preset, self.device = config, preset, device
        mc = self.settings = config.mask_autoencoder
        self.patch: tuple[int, int, int] = tuple(int(p) for p in mc.patch_size)  # type: ignore[assignment]
        self.classes = int(preset.num_classes)
        self._table = channel_to_id_table()
        self.volumes, self.val_volumes = self._read_masks(root, train, val, ranks or Ranks())
        runtime = RuntimeOptions()  # weights-neutral options off: CPU-safe, deterministic
        with torch.random.fork_rng(devices=[]):  # seeded initial weights: equal runs start equal
            torch.manual_seed(config.seed)
            if config.init.mask_autoencoder:
                path = config.init.mask_autoencoder
                self.model, _ = load_mask_network(preset, "autoencoder", path, runtime)
            else:
                self.model = build_mask_network(preset, "autoencoder", runtime)
        self.loss = DiceCELoss(
            to_onehot_y=True, softmax=True, batch=True, lambda_dice=mc.dice_weight, lambda_ce=mc.ce_weight
        )
        log.info(
            "mask_autoencoder: %d training and %d validation masks, patch %s, %d channels, "
            "Dice x %g + CE x %g + KL x %g",
            len(self.volumes),
            len(self.val_volumes),
            list(self.patch),
            self.classes,
            mc.dice_weight,
            mc.ce_weight,
            mc.kl_weight,
        )

    def _read_masks(
        self,
        root: Path,
        train: list[tuple[int, dict[str, Any]]],
        val: list[tuple[int, dict[str, Any]]],
        ranks: Ranks,
    ) -> tuple[MaskVolumes, MaskVolumes]:
        loader, spacing = self.config.loader, self.settings.spacing

        def hold(items: list[dict], min_size: tuple[int, int, int] | None, rate: float) -> MaskVolumes:
            return MaskVolumes(items, min_size, rate, loader.num_workers, ranks.is_main, spacing)

        return read_stage_volumes(
            train,
            val,
            lambda entries, what: check_masks(entries, root, what),
            hold,
            self.patch,
            loader.cache_rate,
            ranks,
            "mask",
            "the mask_autoencoder stage has no training masks",
        )

    def batch_draw(self) -> PatchDraw:
        """Draws ``$.batch_size`` random patches (N, 1, *patch_size) of channel indices per step."""
        return PatchDraw(self.volumes, self.config.batch_size, self.patch, 0.0)  # type: ignore[arg-type]

    def bit_planes(self, channels: torch.Tensor) -> torch.Tensor:
        """(N, 1, X, Y, Z) channel indices -> (N, 8, X, Y, Z) bit-planes of their MAISI ids."""
        return binarize_labels(channels_to_maisi_ids(channels.long(), self._table.to(channels.device)))

    def train_loss(self, model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms on the step's patches (N, 1, *patch_size) of channel indices."""
        mc = self.settings
        target = batch.to(self.device).long()
        logits, z_mu, z_sigma = model(self.bit_planes(target))
        terms = {"dice_ce": self.loss(logits.float(), target), "kl": kl_divergence(z_mu, z_sigma)}
        terms["loss"] = terms["dice_ce"] + mc.kl_weight * terms["kl"]
        return terms

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, channels: torch.Tensor) -> torch.Tensor:
        """(1, X, Y, Z) channel indices -> (X, Y, Z) reconstructed channel indices (uint8, CPU), window by
        window without overlap, argmax inside each window."""
        roi = tuple(int(r) for r in self.settings.val_roi_size)
        padded = convert_to_tensor(
            DivisiblePad(k=roi, mode="constant", method="end")(channels), track_meta=False
        )
        inferer = SlidingWindowInferer(
            roi_size=roi, sw_batch_size=1, overlap=0.0, mode="constant", sw_device=self.device, device="cpu"
        )

        def window(tile: torch.Tensor) -> torch.Tensor:  # one window's logits live only here
            return model.reconstruct(self.bit_planes(tile)).argmax(dim=1, keepdim=True).float()

        # windows tile the padded mask exactly once, so the "blend" of each voxel is its one window's value
        out = inferer(padded[None].float().to(self.device), window)  # the output takes the input's dtype
        size = channels.shape[1:]
        return convert_to_tensor(out, track_meta=False)[0, 0, : size[0], : size[1], : size[2]].round().byte()

    @torch.no_grad()
    def validate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Mean Dice (foreground classes of each mask) and voxel accuracy over the held-out masks."""
        if not len(self.val_volumes):
            return {}, {}
        was_training = model.training
        model.eval()
        dice, accuracy, images = [], [], {}
        for i in range(len(self.val_volumes)):
            target = self.val_volumes[i]
            predicted = self.reconstruct(model, target)
            scores = dice_and_accuracy(target[0], predicted, self.classes)
            dice.append(scores["dice"])
            accuracy.append(scores["accuracy"])
            if i == 0:
                images = {
                    "mask": channel_slice(target[0], self.classes),
                    "reconstruction": channel_slice(predicted, self.classes),
                }
        model.train(was_training)
        return {"dice": float(np.nanmean(dice)), "accuracy": float(np.mean(accuracy))}, images

    def export(self, model: nn.Module, folder: Path, config_sha256: str) -> list[Path]:
        path = Path(folder) / EXPORT_NAME
        part = CHECKPOINT_PART["autoencoder"]
        return [save_checkpoint(path, model, self.preset, part, config_sha256=config_sha256)]

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass
