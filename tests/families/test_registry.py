"""The registry of model families: every preset found once, its conditions, foreign config keys refused by
name, and no torch at import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maisi.errors import InputError
from maisi.families.ct import PRESETS
from maisi.families.ldm import LDM_PRESETS
from maisi.families.mask import MASK_PRESETS
from maisi.families.registry import (
    CONDITION_KEYS,
    FAMILIES,
    find_preset,
    foreign_key_problems,
    foreign_keys,
    preset_names,
)

REPO = Path(__file__).resolve().parents[2]


def test_every_preset_of_every_family_is_found_once():
    names = preset_names()
    assert len(names) == len(PRESETS) + len(MASK_PRESETS) + len(LDM_PRESETS)
    assert {n for n, f in names.items() if f == "maisi"} == set(PRESETS)
    assert {n for n, f in names.items() if f == "maisi-mask"} == set(MASK_PRESETS)
    assert {n for n, f in names.items() if f == "ldm"} == set(LDM_PRESETS)
    assert find_preset("brats-3d-ldm").preset is LDM_PRESETS["brats-3d-ldm"]


@pytest.mark.parametrize(
    ("name", "family", "conditions"),
    [
        ("maisi-ct-ddpm", "maisi", {"mask", "body_region", "spacing"}),
        ("maisi-ct-rflow", "maisi", {"mask", "spacing", "modality"}),
        ("maisi-mr-rflow", "maisi", {"spacing", "modality"}),  # no ControlNet released for MR
        ("maisi-mask-ddpm", "maisi-mask", set()),
        ("brats-2d-ldm", "ldm", set()),
        ("brats-3d-ldm", "ldm", set()),
        ("cxr-text-ldm", "ldm", {"prompts"}),
        ("tiny-text-ldm-3d", "ldm", {"prompts"}),
    ],
)
def test_lookup_gives_the_family_and_the_conditions_its_networks_take(name, family, conditions):
    entry = find_preset(name)
    assert entry.family.name == family and entry.conditions == conditions


def test_maisi_configs_keep_taking_the_four_conditions_with_every_preset():
    for name in PRESETS:
        assert find_preset(name).accepted == {"mask", "body_region", "spacing", "modality"}


def test_keys_a_family_does_not_take_are_listed_by_name():
    keys = ["preset", "checkpoints", "mask", "body_region", "anatomy", "prompts", "sampling", "quality_check"]
    assert foreign_keys("brats-2d-ldm", keys) == [
        "mask",
        "body_region",
        "anatomy",
        "prompts",
        "quality_check",
    ]
    assert foreign_keys("cxr-text-ldm", keys) == ["mask", "body_region", "anatomy", "quality_check"]
    assert foreign_keys("maisi-ct-rflow", keys) == ["prompts"]
    assert foreign_keys("maisi-ct-ddpm", ["modality", "text_encoder"]) == ["text_encoder"]
    (problem,) = foreign_key_problems("brats-3d-ldm", ["spacing", "seed"])
    assert problem == (
        "'spacing' (condition 'spacing') is not taken by preset 'brats-3d-ldm' (family ldm, which takes "
        "no conditions); remove it"
    )
    (problem,) = foreign_key_problems("tiny-text-ldm-2d", ["enforce_preset_limits"])
    assert "a key of the maisi family only" in problem and "which takes prompts" in problem


def test_every_condition_key_of_the_shipped_schema_exists():
    """The condition keys are the inference schema's (prompts and text_encoder arrive with text configs)."""
    schema = json.loads((REPO / "maisi" / "config" / "schemas" / "infer.schema.json").read_text())
    keys = {k for c, ks in CONDITION_KEYS.items() if c != "prompts" for k in ks}
    assert keys <= set(schema["properties"])


def test_unknown_preset_names_the_closest_and_every_family():
    with pytest.raises(InputError, match=r"unknown preset 'cxr-ldm'\. Did you mean 'cxr-text-ldm'\?") as err:
        find_preset("cxr-ldm")
    assert all(f"{f}: " in str(err.value) for f in FAMILIES)


def test_the_registry_imports_without_torch():
    code = (
        "import sys; from maisi.families.registry import find_preset, preset_names; preset_names(); "
        "find_preset('maisi-ct-rflow'); print('torch' in sys.modules, 'monai' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
