"""Images for the autoencoder stage (CT; MR for an entry whose ``modality`` is MR): checked up front, held
in memory up to a ``cache_rate``, patches drawn from a generator the caller seeds.

Every image's header is read before the first step (missing or unreadable files are listed at once). The
first ``cache_rate`` of the images are then read, converted to the VAE's [0, 1] scale
(:func:`maisi.intensity.to_unit`: CT HU [-1000, 1000]; MR its own 0-99.5 percentile range) and held (MONAI
``CacheDataset``); the others are read from disk each time a patch is drawn from them, so with ``cache_rate``
0 memory holds only the batches in flight, whatever the size of the datalist. A held image with NaN/inf voxels
is refused before the first step; one read later stops the run naming its file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, SpatialPad, Transform
from monai.utils import convert_to_tensor

from maisi.data.datalist import case_modality
from maisi.data.io import read_geometry, read_volume
from maisi.distributed import Ranks
from maisi.errors import InputError
from maisi.intensity import to_unit

FOREGROUND_UNIT = (
    -950.0 + 1000.0
) / 2000.0  # -950 HU on the VAE's [0, 1] scale: lung and tissue, not outside air
MAX_REDRAWS = 10


def check_images(
    entries: list[tuple[int, dict[str, Any]]], root: Path, what: str
) -> tuple[list[dict], list[str]]:
    """Headers of every image of ``entries`` (cheap: no voxels are read).

    Args:
        entries: ``(index in the datalist, entry)`` pairs; ``entry["image"]`` is relative to ``root``.
        root: folder of the datalist's paths.
        what: ``"training"`` or ``"validation"``, for messages.

    Returns:
        (items, problems): ``{"image": path, "where": datalist position, "modality": name}`` per readable
        image (modality: the entry's, else "ct"), and one
        message per missing or unreadable one.
    """
    return check_headers(
        entries,
        root,
        what,
        "image",
        "each entry needs the path of a CT image",
        lambda entry: {"modality": case_modality(entry, "ct")},
    )


def check_headers(
    entries: list[tuple[int, dict[str, Any]]],
    root: Path,
    what: str,
    key: str,
    need: str,
    extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[list[dict], list[str]]:
    """Headers of every entry's volume under ``key`` (no voxels read), shared by the CT and mask stages.

    Args:
        entries: ``(index in the datalist, entry)`` pairs; ``entry[key]`` is relative to ``root``.
        root: folder of the datalist's paths.
        what: ``"training"`` or ``"validation"``, for messages.
        key: the entry's path key (``"image"`` or ``"label"``).
        need: why the path is needed, said when it is missing.
        extra: more fields of an item, from its entry.

    Returns:
        (items, problems): ``{key: path, "where": datalist position, **extra(entry)}`` per readable volume,
        and one message per missing or unreadable one.
    """
    items, problems = [], []
    for i, entry in entries:
        where = f"$.training[{i}].{key} ({what})"
        if not isinstance(entry.get(key), str):
            problems.append(f"{where}: missing ({need})")
            continue
        path = root / entry[key]
        try:
            read_geometry(path)
        except InputError as e:
            problems.append(f"{where}: {e}")
            continue
        items.append({key: str(path), "where": where, **(extra(entry) if extra else {})})
    return items, problems


class LoadUnitCTd(Transform):
    """``{"image": path, "where": ...}`` -> ``{"image": (1, X, Y, Z) float32 in [0, 1], RAS}``, padded
    (constant 0, i.e. -1000 HU, symmetric) to at least ``min_size``; or ``{"problem": message}`` for an
    unreadable or non-finite image. Problems are returned, not raised: raised in a DataLoader worker they
    would arrive wrapped in its traceback."""

    def __init__(self, min_size: tuple[int, int, int] | None):
        self.pad = (
            SpatialPad(spatial_size=min_size, method="symmetric", mode="constant") if min_size else None
        )

    def __call__(self, item: dict[str, str]) -> dict[str, Any]:
        try:
            volume = read_volume(item["image"])
        except InputError as e:
            return {"problem": f"{item['where']}: {e}"}
        hu = np.asarray(volume.array, dtype=np.float32)
        bad = int(hu.size - np.isfinite(hu).sum())
        if bad:
            return {"problem": f"{item['where']}: {item['image']} holds {bad} NaN/infinite voxels"}
        try:
            unit, _ = to_unit(hu, item.get("modality", "ct"), item["image"])
        except InputError as e:  # a constant MR image: nothing to scale
            return {"problem": f"{item['where']}: {e}"}
        x = torch.from_numpy(unit)[None]
        if self.pad is not None:
            x = convert_to_tensor(self.pad(x), track_meta=False)
        return {"image": x.contiguous()}


class HeldVolumes:
    """Checked volumes (``{key: path, "where": ...}`` items) loaded by ``load``, by position.

    The first ``int(cache_rate * n)`` are read here and held; the others are read on every access. Shared by
    the CT (:class:`CTVolumes`) and mask (``MaskVolumes``) autoencoder stages.
    """

    key = "image"  # the item key ``load`` fills
    what = "autoencoder"  # names the datalist in messages

    def __init__(self, items: list[dict], load: Transform, cache_rate: float, threads: int, progress: bool):
        """Read the held share (``threads`` reader threads; a progress bar if ``progress``)."""
        self.data = CacheDataset(
            items,
            Compose([load]),
            cache_rate=cache_rate,
            num_workers=max(1, threads),
            progress=progress,
            copy_cache=False,
        )
        held = [self.data[i] for i in range(self.held)]  # from the cache: nothing is read again
        self.problems: list[str] = [item["problem"] for item in held if "problem" in item]

    @property
    def held(self) -> int:
        """How many volumes are held in memory."""
        return int(self.data.cache_num)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        """The volume at ``index``.

        Raises:
            InputError: a volume not held turned out unreadable or invalid (naming its file).
        """
        item = self.data[index]
        if "problem" in item:
            raise InputError(f"{self.what} datalist problem found while training: {item['problem']}")
        return item[self.key]


class CTVolumes(HeldVolumes):
    """Images checked by :func:`check_images` as (1, X, Y, Z) tensors in [0, 1], by position.

    The first ``int(cache_rate * n)`` are read here and held; the others are read on every access.
    """

    def __init__(
        self,
        items: list[dict],
        min_size: tuple[int, int, int] | None,
        cache_rate: float,
        threads: int = 1,
        progress: bool = False,
    ):
        super().__init__(items, LoadUnitCTd(min_size), cache_rate, threads, progress)


def refuse_problems(problems: list[str], what: str) -> None:
    """Raise one InputError listing every problem of the ``what`` datalist; nothing when there are none."""
    if problems:
        raise InputError(f"{what} datalist problems ({len(problems)}):\n  " + "\n  ".join(problems))


V = TypeVar("V", bound=HeldVolumes)


def read_stage_volumes(
    train: list[tuple[int, dict[str, Any]]],
    val: list[tuple[int, dict[str, Any]]],
    check: Callable[[list[tuple[int, dict[str, Any]]], str], tuple[list[dict], list[str]]],
    hold: Callable[[list[dict], tuple[int, int, int] | None, float], V],
    patch: tuple[int, int, int],
    cache_rate: float,
    ranks: Ranks,
    what: str,
    empty: str,
) -> tuple[V, V]:
    """Check every header, then read the volumes to hold: this process's share of the training volumes
    (under torchrun, padded to at least ``patch``), the validation volumes on the validating process only.

    Args:
        train: ``(datalist index, entry)`` of the training cases; ``val`` the same for validation.
        check: headers of entries (:func:`check_images` or ``check_masks`` bound to the root).
        hold: ``(items, min_size, cache_rate)`` -> the stage's :class:`HeldVolumes`.
        what: names the datalist in messages; ``empty``: the message when there are no training cases.

    Raises:
        InputError: every problem of every case at once, or no training cases.
    """
    train_items, problems = check(train, "training")
    val_items, val_problems = check(val, "validation")
    refuse_problems(problems + val_problems, what)
    if not train_items:
        raise InputError(empty)
    if ranks.world_size > 1 and len(train_items) >= ranks.world_size:
        train_items = ranks.shard(train_items)
    volumes = hold(train_items, patch, cache_rate)
    val_volumes = hold(val_items, None, cache_rate if ranks.is_main else 0.0)
    refuse_problems(volumes.problems + val_volumes.problems, what)
    return volumes, val_volumes


def draw_patches(
    volumes: Sequence[torch.Tensor],
    batch_size: int,
    patch: tuple[int, int, int],
    min_foreground: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``batch_size`` random patches (N, 1, *patch) from random volumes, drawn with ``generator`` only (None:
    torch's global one).

    Every volume must be at least ``patch`` in size (pad them when loading). With ``min_foreground`` > 0 a
    patch with a smaller fraction of voxels above -950 HU is redrawn (up to ``MAX_REDRAWS`` times, then the
    last draw is kept): chest scans are mostly air around the body, which teaches the VAE nothing.
    """
    out = []
    index, v = -1, None
    for _ in range(batch_size):
        for _ in range(MAX_REDRAWS + 1):
            drawn = int(torch.randint(len(volumes), (), generator=generator))
            if drawn != index:  # a redraw of the same image does not read it again
                index, v = drawn, volumes[drawn]
            corner = [
                int(torch.randint(s - p + 1, (), generator=generator)) for s, p in zip(v.shape[1:], patch)
            ]
            x, y, z = corner
            crop = v[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]]
            if min_foreground <= 0 or float((crop > FOREGROUND_UNIT).float().mean()) >= min_foreground:
                break
        out.append(crop.clone())  # a copy: a view would keep an image read from disk alive until the stack
    return torch.stack(out)


@dataclass(frozen=True)
class PatchDraw:
    """One step's batch of patches from a generator (runs in DataLoader workers: picklable, no network)."""

    volumes: CTVolumes
    batch_size: int
    patch: tuple[int, int, int]
    min_foreground: float

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        return draw_patches(self.volumes, self.batch_size, self.patch, self.min_foreground, generator)
