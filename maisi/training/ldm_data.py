"""Images for the plain-LDM stages: a Decathlon ``dataset.json`` or a maisi datalist, MONAI transforms.

As the BraTS bundles read them (``configs/train_autoencoder.json`` of ``brats_mri_axial_slices_generative_
diffusion`` and ``brats_mri_generative_diffusion``)::

    LoadImaged -> EnsureChannelFirstd -> the channel chosen by name -> Orientationd RAS
    -> Spacingd (bilinear, the preset's spacing; 2D presets in-plane only) -> CenterSpatialCropd
    -> ScaleIntensityRangePercentilesd (0-100 for 2D, 0-99.5 for 3D, to [0, 1]) -> SpatialPadd to the crop

run once per image (held in memory up to ``$.loader.cache_rate``, MONAI ``CacheDataset``), then per step:

* 2D presets: ``RandSpatialCropSamplesd`` of ``$.batch_size`` axial slices ``[x, y, 1]`` of one image and
  ``SqueezeDimd`` (the 2D bundle: one image, 26 slices per step), optional ``RandFlipd`` on both axes;
* 3D presets: ``$.batch_size`` ``RandSpatialCropd`` patches of random images.

The 3D bundle scales intensities after its random crop, so the scale depends on the crop; here the scaling is
part of the per-image steps (after the centre crop), the same for every crop of an image.

Every random draw comes from the generator the training loop seeds from (seed, step, rank): the image index
and one seed for the MONAI transforms' own random state, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import (
    CenterSpatialCrop,
    CenterSpatialCropd,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandFlipd,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
    Transform,
)
from monai.utils import convert_to_tensor

from maisi.config.loader import read_json
from maisi.config.train_config import LDMDataConfig
from maisi.data.datalist import read_datalist, split_by_fold
from maisi.errors import InputError
from maisi.families.ldm import LDMPreset
from maisi.training.ct_data import HeldVolumes, check_headers

Entries = list[tuple[int, dict[str, Any]]]
BUNDLE_PERCENTILES = {2: (0.0, 100.0), 3: (0.0, 99.5)}  # the 2D and 3D BraTS bundles


@dataclass(frozen=True)
class LDMDataset:
    """The cases of ``$.datalist`` for a plain-LDM preset.

    Attributes:
        path: the dataset.json or datalist.
        layout: ``"decathlon"`` (a ``modality`` table) or ``"datalist"``.
        entries: the cases as ``(index, entry)``; ``entry["image"]`` relative to ``root`` (or absolute).
        root: folder of the relative paths.
        channel: index of the channel trained on (None: the images must have one channel).
        channel_name: its name in the ``modality`` table, if any.
    """

    path: Path
    layout: str
    entries: Entries
    root: Path
    channel: int | None
    channel_name: str | None


def _channel_names(path: Path, modality: Any) -> dict[int, str]:
    if not isinstance(modality, dict) or not modality:
        raise InputError(f"{path}: 'modality' must be a table of channel numbers to names, got {modality!r}")
    try:
        return {int(k): str(v) for k, v in sorted(modality.items(), key=lambda kv: int(kv[0]))}
    except ValueError:
        raise InputError(f"{path}: 'modality' keys must be channel numbers, got {list(modality)}") from None


def choose_channel(path: Path, names: dict[int, str], wanted: str | None) -> tuple[int, str]:
    """The channel index named ``wanted`` (case-insensitive) among a dataset's ``modality`` ``names``.

    Raises:
        InputError: naming ``$.ldm.channel``, the value and every available name.
    """
    listed = ", ".join(f"'{n}' ({i})" for i, n in names.items())
    if wanted is None:
        if len(names) == 1:
            return next(iter(names.items()))
        raise InputError(
            f"$.ldm.channel: null, but the images of {path} have {len(names)} channels: {listed}; "
            "choose one by name"
        )
    for index, name in names.items():
        if name.lower() == wanted.lower():
            return index, name
    raise InputError(f"$.ldm.channel: '{wanted}' is not a channel of {path}; its channels are {listed}")


def read_ldm_dataset(
    path: str | Path, data_root: str | Path | None, channel: str | None, check_channel: bool = True
) -> LDMDataset:
    """Read a Decathlon ``dataset.json`` (recognised by its ``modality`` table; its ``training`` section,
    paths resolved by MONAI's ``load_decathlon_datalist``) or a maisi datalist. ``check_channel`` False
    reads the cases only (the run's path guard): no channel is chosen.

    Raises:
        InputError: unreadable file, no ``training`` cases, an unknown channel name, or a channel name for a
            datalist (whose images have no names).
    """
    path = Path(path)
    data = read_json(path)
    root = Path(data_root) if data_root else path.parent
    if isinstance(data, dict) and "modality" in data:
        index, name = None, None
        if check_channel:
            index, name = choose_channel(path, _channel_names(path, data["modality"]), channel)
        try:
            items = load_decathlon_datalist(path, is_segmentation=False, base_dir=root)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not a readable Decathlon dataset.json ({e})") from None
        missing = [i for i, item in enumerate(items) if not isinstance(item.get("image"), str)]
        if missing:
            raise InputError(f"{path}: $.training[{missing[0]}] has no 'image' path")
        return LDMDataset(path, "decathlon", list(enumerate(items)), root, index, name)
    if channel is not None and check_channel:
        raise InputError(
            f"$.ldm.channel: '{channel}' given, but {path} is a maisi datalist, whose images have no channel "
            "names (a Decathlon dataset.json names them in 'modality'); set it to null"
        )
    return LDMDataset(path, "datalist", list(enumerate(read_datalist(path)["training"])), root, None, None)


def split_cases(dataset: LDMDataset, fold: int | None, num_validation: int) -> tuple[Entries, Entries]:
    """(training, validation) cases: by ``$.fold`` when set (entries' ``fold``), else the last
    ``num_validation`` cases validate.

    Raises:
        InputError: an empty side (naming the key).
    """
    if fold is not None:
        return split_by_fold({"training": [e for _, e in dataset.entries]}, fold)
    n = len(dataset.entries)
    if num_validation >= n:
        raise InputError(
            f"$.ldm.num_validation: {num_validation}, but {dataset.path} has {n} case(s): no training case "
            "would be left"
        )
    cut = n - num_validation
    return dataset.entries[:cut], dataset.entries[cut:]


def check_ldm_images(entries: Entries, root: Path, what: str) -> tuple[list[dict], list[str]]:
    """Headers of every entry's ``image`` (no voxels read): (items to load, problems)."""
    return check_headers(entries, root, what, "image", "each case needs the path of an image")


@dataclass(frozen=True)
class ImageSteps:
    """The per-image steps for one preset and ``$.ldm``: see the module docstring."""

    spatial_dims: int
    channel: int | None
    spacing: tuple[float, ...] | None
    center_crop: tuple[int, int, int] | None
    percentiles: tuple[float, float]

    @classmethod
    def of(cls, preset: LDMPreset, ldm: LDMDataConfig, channel: int | None) -> ImageSteps:
        spacing = preset.spacing_mm if ldm.resample else None
        lo_hi = ldm.percentiles or BUNDLE_PERCENTILES[preset.spatial_dims]
        return cls(preset.spatial_dims, channel, spacing, ldm.center_crop, (float(lo_hi[0]), float(lo_hi[1])))


def _pick_channel(image: Any, index: int) -> Any:
    return image[index : index + 1]


class PrepareImaged(Transform):
    """``{"image": path, "where": ...}`` -> ``{"image": (1, X, Y, Z) float32 in [0, 1], RAS}`` padded
    (0, symmetric) to at least ``min_size``; or ``{"problem": message}`` (returned, not raised: raised in a
    DataLoader worker it would arrive wrapped in the worker's traceback)."""

    def __init__(self, steps: ImageSteps, min_size: tuple[int, int, int] | None):
        self.steps = steps
        self.load = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])
        rest: list[Transform] = [
            Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
        ]
        if steps.spacing is not None:  # 2D presets: in-plane spacing, the slice spacing kept (<= 0)
            pixdim = list(steps.spacing) + [0.0] * (3 - len(steps.spacing))
            rest.append(Spacingd("image", pixdim=pixdim, mode="bilinear"))
        if steps.center_crop is not None:
            rest.append(CenterSpatialCropd("image", roi_size=list(steps.center_crop)))
        lo, hi = steps.percentiles
        rest.append(
            ScaleIntensityRangePercentilesd("image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
        )
        if min_size is not None:
            rest.append(
                SpatialPadd("image", spatial_size=list(min_size), method="symmetric", mode="constant")
            )
        self.rest = Compose(rest)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        where = item["where"]
        try:
            image = self.load({"image": item["image"]})["image"]
        except Exception as e:  # noqa: BLE001 - MONAI's readers raise many types for unreadable files
            return {"problem": f"{where}: {item['image']}: cannot read ({type(e).__name__}: {e})"}
        if image.ndim != 4:
            return {"problem": f"{where}: {item['image']}: {image.ndim - 1}D image, expected a 3D volume"}
        channels, index = image.shape[0], self.steps.channel
        if index is None and channels != 1:
            return {
                "problem": f"{where}: {item['image']} has {channels} channels; name one with $.ldm.channel"
            }
        if index is not None and index >= channels:
            return {"problem": f"{where}: {item['image']} has {channels} channel(s), no channel {index}"}
        image = _pick_channel(image, index or 0)
        if not bool(torch.isfinite(torch.as_tensor(image)).all()):
            return {"problem": f"{where}: {item['image']} holds NaN/infinite voxels"}
        out = self.rest({"image": image.float()})["image"]
        return {"image": convert_to_tensor(out, track_meta=False, dtype=torch.float32).contiguous()}


class LDMVolumes(HeldVolumes):
    """Prepared images (1, X, Y, Z) in [0, 1] by position, the first ``cache_rate`` held."""

    what = "LDM"

    def __init__(
        self,
        items: list[dict],
        steps: ImageSteps,
        min_size: tuple[int, int, int] | None,
        cache_rate: float,
        threads: int = 1,
        progress: bool = False,
    ):
        super().__init__(items, PrepareImaged(steps, min_size), cache_rate, threads, progress)


def crop_size(patch: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D crop of a 2D slice ``(x, y)`` (one axial slice) or of a 3D patch."""
    return (patch[0], patch[1], 1) if len(patch) == 2 else (patch[0], patch[1], patch[2])


@functools.lru_cache(maxsize=8)
def _random_steps(patch: tuple[int, ...], batch_size: int, flip_prob: float) -> Compose:
    flips = [RandFlipd("image", prob=flip_prob, spatial_axis=a) for a in (0, 1)] if flip_prob > 0 else []
    if len(patch) == 2:
        crop = RandSpatialCropSamplesd("image", roi_size=list(crop_size(patch)), num_samples=batch_size)
        return Compose([crop, SqueezeDimd("image", dim=3), *flips])
    return Compose([RandSpatialCropd("image", roi_size=list(patch), random_size=False), *flips])


@dataclass(frozen=True)
class CropDraw:
    """One step's crops (N, 1, *patch) from a generator: 2D: ``batch_size`` axial slices of one image; 3D:
    ``batch_size`` patches of random images. Runs in DataLoader workers (picklable, no network)."""

    volumes: LDMVolumes
    batch_size: int
    patch: tuple[int, ...]
    flip_prob: float = 0.0

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        steps = _random_steps(self.patch, self.batch_size, self.flip_prob)
        images = 1 if len(self.patch) == 2 else self.batch_size
        out = []
        for _ in range(images):
            index = int(torch.randint(len(self.volumes), (), generator=generator))
            steps.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            drawn = steps({"image": self.volumes[index]})
            for d in drawn if isinstance(drawn, list) else [drawn]:
                out.append(convert_to_tensor(d["image"], track_meta=False, dtype=torch.float32))
        return torch.stack(out).contiguous()


def centre_crop(volume: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """The deterministic validation crop of a (1, X, Y, Z) volume: its mid axial slice (1, x, y) for a 2D
    ``patch``, its centre (1, x, y, z) for a 3D one."""
    out = convert_to_tensor(CenterSpatialCrop(list(crop_size(patch)))(volume), track_meta=False)
    return out[..., 0] if len(patch) == 2 else out


def view_2d(image: torch.Tensor) -> np.ndarray:
    """A (x, y) slice or the axial mid-slice of an (x, y, z) volume, anterior up, float32 for TensorBoard."""
    s = image if image.ndim == 2 else image[:, :, image.shape[2] // 2]
    return np.ascontiguousarray(s.float().cpu().numpy().T[::-1], dtype=np.float32)
