"""One registry of model families: which family a preset belongs to and which conditions it takes.

Families and where their presets live (imported by name, when first asked, so this module needs neither
torch nor MONAI):

- ``maisi``: MAISI CT/MR (ControlNet on masks, body region, spacing, modality), :mod:`maisi.families.ct`;
- ``maisi-mask``: MAISI's mask generator (its own size-vector condition, none of the shared ones),
  :mod:`maisi.families.mask`;
- ``ldm``: plain latent diffusion, 2D or 3D (:mod:`maisi.families.ldm`); text LDMs are the LDM presets whose
  UNet has cross-attention, and take ``prompts``.

A condition is fed by top-level keys of an inference config (:data:`CONDITION_KEYS`). A config that gives a
key of a condition its preset's family does not take is refused by name (exit 2):
:func:`foreign_key_problems`. The ``maisi`` family takes its four conditions with every preset, as the CT
configs always have (a preset without the matching input ignores it; the CT checks refuse a mask for the
presets without ControlNet); LDM presets take exactly what their networks use.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, get_args

from maisi.errors import InputError

FamilyName = Literal["maisi", "maisi-mask", "ldm"]
Condition = Literal["mask", "body_region", "spacing", "modality", "prompts"]
CONDITIONS: tuple[Condition, ...] = get_args(Condition)

# The inference-config keys that give each condition.
CONDITION_KEYS: dict[Condition, tuple[str, ...]] = {
    "mask": ("mask", "masks", "datalist", "anatomy", "label_dict"),
    "body_region": ("body_region",),
    "spacing": ("spacing",),
    "modality": ("modality",),
    "prompts": ("prompts", "text_encoder", "sampling.null_prompt"),
}
# Inference-config keys that only one family takes, top-level or ``section.key`` (:func:`config_keys`):
# MAISI's HU check, grid limits, grid, tiled decoder, ControlNet and torch.compile; the plain LDMs' timestep
# spacing and scale-factor override (MAISI's checkpoints hold their scale factor).
FAMILY_ONLY_KEYS: dict[str, tuple[str, ...]] = {
    "maisi": (
        "quality_check",
        "enforce_preset_limits",
        "output_size",
        "decoding",
        "compile",
        "checkpoints.controlnet",
        "sampling.conditioning_scale",
    ),
    "ldm": ("sampling.timestep_spacing", "sampling.scale_factor"),
}


@dataclass(frozen=True)
class Family:
    """A model family: its presets' registry and the conditions its configs may give.

    Attributes:
        name: the family's name.
        description: one line for humans.
        registry: ``"module:attribute"`` of its ``{name: preset}`` dict.
        conditions: what every preset of the family takes, or None when each preset takes exactly the
            conditions its networks use (:func:`preset_conditions`).
    """

    name: FamilyName
    description: str
    registry: str
    conditions: frozenset[Condition] | None

    def presets(self) -> dict[str, Any]:
        """The family's presets by name (its registry module is imported now)."""
        module, attribute = self.registry.split(":")
        return getattr(importlib.import_module(module), attribute)


FAMILIES: dict[FamilyName, Family] = {
    f.name: f
    for f in (
        Family(
            "maisi",
            "MAISI CT/MR latent diffusion (ControlNet on label masks)",
            "maisi.families.ct:PRESETS",
            frozenset({"mask", "body_region", "spacing", "modality"}),
        ),
        Family(
            "maisi-mask",
            "MAISI mask generator (organ/tumour size vector)",
            "maisi.families.mask:MASK_PRESETS",
            frozenset(),
        ),
        Family(
            "ldm",
            "Plain latent diffusion, 2D or 3D, unconditional or on text prompts",
            "maisi.families.ldm:LDM_PRESETS",
            None,
        ),
    )
}


@dataclass(frozen=True)
class PresetEntry:
    """A preset found in the registry of families.

    Attributes:
        name: the preset's name.
        family: its family.
        preset: the preset object of the family's registry.
        conditions: what its networks take.
        accepted: what its configs may give (the family's conditions, or the preset's own).
    """

    name: str
    family: Family
    preset: Any
    conditions: frozenset[Condition]
    accepted: frozenset[Condition]


def preset_conditions(family: FamilyName, preset: Any) -> frozenset[Condition]:
    """The conditions the networks of ``preset`` (a preset of ``family``) take."""
    if family == "maisi":
        used = {
            "mask": preset.has_controlnet,
            "body_region": preset.uses_body_region,
            "spacing": preset.uses_spacing,
            "modality": preset.uses_modality,
        }
        return frozenset(c for c, yes in used.items() if yes)  # type: ignore[misc]
    if family == "ldm":
        return frozenset(preset.conditions)
    return frozenset()


@cache
def _index() -> dict[str, tuple[FamilyName, Any]]:
    """Preset name -> (family, preset) over every family; a name in two families is a packaging bug."""
    index: dict[str, tuple[FamilyName, Any]] = {}
    for family in FAMILIES.values():
        for name, preset in family.presets().items():
            if name in index:
                raise ValueError(f"preset '{name}' is in both families {index[name][0]} and {family.name}")
            index[name] = (family.name, preset)
    return index


def preset_names() -> dict[str, FamilyName]:
    """Every preset name with its family, in the order of :data:`FAMILIES`."""
    return {name: family for name, (family, _) in _index().items()}


def find_preset(name: str) -> PresetEntry:
    """The preset ``name`` of whichever family has it.

    Raises:
        InputError: no family has it (the message suggests the closest name and lists every family's).
    """
    index = _index()
    if name not in index:
        hint = difflib.get_close_matches(name, index, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        known = "; ".join(f"{f}: {', '.join(n for n, (g, _) in index.items() if g == f)}" for f in FAMILIES)
        raise InputError(f"unknown preset '{name}'.{suggestion} Known presets by family: {known}")
    family_name, preset = index[name]
    family = FAMILIES[family_name]
    conditions = preset_conditions(family_name, preset)
    accepted = family.conditions if family.conditions is not None else conditions
    return PresetEntry(name, family, preset, conditions, accepted)


def config_keys(data: Any) -> list[str]:
    """The keys an inference config gives, in file order: each top-level key, and ``section.key`` for the
    keys inside a top-level object (``sampling.timestep_spacing``); empty when ``data`` is not an object."""
    if not isinstance(data, dict):
        return []
    keys: list[str] = []
    for key, value in data.items():
        keys.append(str(key))
        if isinstance(value, dict):
            keys += [f"{key}.{inner}" for inner in value]
    return keys


def foreign_keys(name: str, keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` (top-level keys of an inference config) that preset ``name``'s family does
    not take, in the order given: keys of a condition it does not accept, and keys of another family only.
    Keys no family claims (output, sampling, seed, ...) are never foreign."""
    entry = find_preset(name)
    refused = {k for c in CONDITIONS if c not in entry.accepted for k in CONDITION_KEYS[c]}
    refused |= {k for f, ks in FAMILY_ONLY_KEYS.items() if f != entry.family.name for k in ks}
    return [k for k in keys if k in refused]


def foreign_key_problems(name: str, keys: Iterable[str]) -> list[str]:
    """One message per foreign key (:func:`foreign_keys`), naming the key, the preset and what it takes."""
    entry = find_preset(name)
    takes = ", ".join(c for c in CONDITIONS if c in entry.accepted) or "no conditions"
    owner = {k: c for c, ks in CONDITION_KEYS.items() for k in ks}
    problems = []
    for key in foreign_keys(name, keys):
        only = next((f for f, ks in FAMILY_ONLY_KEYS.items() if key in ks), None)
        what = f"condition '{owner[key]}'" if key in owner else f"a key of the {only} family only"
        problems.append(
            f"'{key}' ({what}) is not taken by preset '{name}' (family {entry.family.name}, which takes "
            f"{takes}); remove it"
        )
    return problems
