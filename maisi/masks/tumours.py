"""MAISI's tumour classes, their host organs and the augmentation settings for each (pure data).

Figures follow MAISI's mask augmentation (MONAI tutorials ``generation/maisi/scripts/augmentation.py``,
NV-Generate-CTMR ``scripts/augmentation.py``): the order in which rules are tried, the host labels, the
refill label, the random ranges of each warp and the acceptance ratios. :mod:`maisi.masks.augment`
applies them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from math import pi
from typing import Literal

BODY = 200
LIVER, PANCREAS, COLON = 1, 4, 62
LUNG_TUMOUR, PANCREATIC_TUMOUR, HEPATIC_TUMOUR, COLON_TUMOUR, BONE_LESION = 23, 24, 26, 27, 128
LUNG_LOBES = (28, 29, 30, 31, 32)
# MAISI's bone mask for lesions: vertebrae C1-L5 (33-56), ribs to sacrum (63-97), costal cartilages, S1
BONES = (*range(33, 57), *range(63, 98), 114, 127)

ELASTIC_SIGMA = (5.0, 8.0)  # voxels, drawn per try
ELASTIC_MAGNITUDE = (100.0, 200.0)
BODY_ZOOM = (0.99, 1.01)  # whole-body zoom when no tumour rule matches
CLOSING_KERNEL = 5  # box kernel of the closing applied to the host and to the moved tumour
RING_KERNEL = 3  # dilation that finds the lobes next to a lung tumour


@dataclass(frozen=True)
class TumourRule:
    """How one tumour class is moved and where it may go.

    Attributes:
        name: what the record calls the rule.
        tumour: the tumour's MAISI id.
        hosts: ids the moved tumour must stay inside (with the tumour's own old voxels).
        refill: id given to the tumour's old voxels; ``None``: the most common host id around the tumour.
        warp: ``"elastic"`` (MONAI ``Rand3DElastic``) or ``"affine"`` (MONAI ``RandAffine``).
        translate: translate range per axis, voxels.
        rotate: rotate range per axis, radians.
        scale: scale range per axis (a factor 1 +- this).
        min_ratio: share of the tumour's voxels the moved tumour must keep.
        relaxed_ratio: the share accepted after ``relax_after`` tries (MAISI's bone and colon rules).
        relax_after: tries before ``relaxed_ratio`` applies.
        give_up_after: MAISI stops trying after this many tries (colon); ``None``: the caller's bound.
        close_host: close the host mask before the inside check (MAISI does, except for bone).
    """

    name: str
    tumour: int
    hosts: tuple[int, ...]
    refill: int | None
    warp: Literal["elastic", "affine"]
    translate: tuple[float, float, float]
    rotate: tuple[float, float, float]
    scale: tuple[float, float, float]
    min_ratio: float = 0.8
    relaxed_ratio: float | None = None
    relax_after: int | None = None
    give_up_after: int | None = None
    close_host: bool = True

    def ratio_at(self, attempt: int) -> float:
        """The acceptance ratio of try number ``attempt`` (1-based)."""
        if self.relaxed_ratio is not None and self.relax_after is not None and attempt > self.relax_after:
            return self.relaxed_ratio
        return self.min_ratio


_TILT = pi / 36  # 5 degrees about each axis
# First matching rule only, in MAISI's order.
RULES: tuple[TumourRule, ...] = (
    TumourRule(
        "bone lesion",
        BONE_LESION,
        BONES,
        BODY,
        "affine",
        translate=(5, 5, 0),
        rotate=(0, 0, 0.1),
        scale=(0.15, 0.15, 0.0),
        relaxed_ratio=0.75,
        relax_after=40,
        close_host=False,
    ),
    TumourRule(
        "hepatic tumor",
        HEPATIC_TUMOUR,
        (LIVER,),
        LIVER,
        "elastic",
        translate=(10, 10, 10),
        rotate=(_TILT, _TILT, _TILT),
        scale=(0.2, 0.2, 0.2),
    ),
    TumourRule(
        "lung tumor",
        LUNG_TUMOUR,
        LUNG_LOBES,
        None,
        "elastic",
        translate=(20, 20, 20),
        rotate=(_TILT, _TILT, pi),
        scale=(0.15, 0.15, 0.15),
        min_ratio=0.85,
    ),
    TumourRule(
        "pancreatic tumor",
        PANCREATIC_TUMOUR,
        (PANCREAS,),
        PANCREAS,
        "elastic",
        translate=(15, 15, 15),
        rotate=(_TILT, _TILT, _TILT),
        scale=(0.1, 0.1, 0.1),
    ),
    TumourRule(
        "colon cancer primaries",
        COLON_TUMOUR,
        (COLON,),
        COLON,
        "elastic",
        translate=(5, 5, 5),
        rotate=(_TILT, _TILT, _TILT),
        scale=(0.1, 0.1, 0.1),
        relaxed_ratio=0.75,
        relax_after=20,
        give_up_after=40,
    ),
)


def rule_for(labels: Iterable[int]) -> TumourRule | None:
    """The first rule whose tumour is among ``labels``; ``None``: the whole-body zoom applies."""
    present = {int(v) for v in labels}
    return next((rule for rule in RULES if rule.tumour in present), None)
