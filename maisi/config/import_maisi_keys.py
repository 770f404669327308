"""MAISI's inference files for ``import-maisi``: their keys and what becomes of them, reading them.

The tables of :mod:`maisi.config.import_maisi`: MAISI's presets and variants, the keys that need no
counterpart (and why), the bundle references that are plain data (``"@key"``, ``"$@key + '/file.pt'"``),
where MAISI's relative paths start, and the released files ``maisi.download`` installs. Pure: JSON in,
JSON out (no torch, MONAI or numpy).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maisi.config.loader import read_json
from maisi.errors import InputError
from maisi.options import REGION_INDEX
from maisi.resources import load_json

PRESETS = ("maisi-ct-rflow", "maisi-ct-ddpm", "maisi-mr-rflow", "maisi-mr-brain-rflow")
VARIANT = {
    "maisi-ct-rflow": "rflow-ct",
    "maisi-ct-ddpm": "ddpm-ct",
    "maisi-mr-rflow": "rflow-mr",
    "maisi-mr-brain-rflow": "rflow-mr-brain",
}  # maisi.download's variant of a preset
MR_PRESETS = ("maisi-mr-rflow", "maisi-mr-brain-rflow")
# MAISI's cfg_guidance_scale of each MR variant: configs/config_maisi_diff_model_rflow-mr*.json
MR_GUIDANCE = {"maisi-mr-rflow": 15, "maisi-mr-brain-rflow": 2}
FIRST_MR_CODE = 8  # MAISI's modality codes: 0-7 CT (0: unknown), 8 and up MR
INNER = "diffusion_unet_inference"  # the block of MAISI's image-only config_maisi_diff_model_*.json
FORMATS = ("nii.gz", "nii", "nrrd", "mha")
# Keys that only a MAISI inference config (or its environment) has; one of them must be present.
SIGNATURE = (
    "num_output_samples",
    "anatomy_list",
    "body_region",
    "controllable_anatomy_size",
    "autoencoder_sliding_window_infer_size",
    "mask_generation_num_inference_steps",
    "trained_autoencoder_path",
    "all_mask_files_json",
    INNER,
)
_REFERENCE = re.compile(r"@(\w+)")
_PATH_JOIN = re.compile(r"""\$@(\w+)\s*\+\s*(['"])([^'"]*)\2""")

_NETWORKS = "a network definition: the preset builds the networks (MONAI classes, the released arguments)"
PATH_A = "used by mask generation (MAISI's Path A) only; the translated config retrieves masks (Path B)"
PATH_B = "used by mask retrieval (MAISI's Path B) only; the translated config generates masks (Path A)"
NO_MASK = "the translated config generates an image only (no mask is retrieved or generated)"
_TRAINING = "a training setting: maisi.train has its own config"
_BUNDLE = "bundle machinery (imports, loaders, the run list): maisi.infer does this itself"
# MAISI key -> why it needs no counterpart here.
NOT_NEEDED: dict[str, str] = {
    **dict.fromkeys(("autoencoder", "diffusion_unet", "controlnet"), _NETWORKS),
    **dict.fromkeys(
        ("autoencoder_def", "diffusion_unet_def", "controlnet_def", "noise_scheduler"),
        _NETWORKS,
    ),
    **dict.fromkeys(("spatial_dims", "image_channels", "latent_channels"), _NETWORKS),
    "latent_shape": "derived from output_size by the preset (output_size / 4)",
    **dict.fromkeys(
        (
            "mask_generation_autoencoder",
            "mask_generation_diffusion",
            "mask_generation_diffusion_unet",
            "mask_generation_autoencoder_def",
            "mask_generation_diffusion_def",
            "mask_generation_noise_scheduler",
            "mask_generation_scale_factor",
            "mask_generation_latent_shape",
            "mask_generation_cfg_guidance_scale",
            "label_dict_remap_json",
            "checkpoint_mask_generation_autoencoder",
            "checkpoint_mask_generation_diffusion_unet",
            "load_mask_generation_autoencoder",
            "load_mask_generation_diffusion",
        ),
        PATH_A,
    ),
    **dict.fromkeys(
        (
            "imports",
            "bundle_root",
            "model_dir",
            "create_output_dir",
            "checkpoint_autoencoder",
            "load_autoencoder",
            "checkpoint_diffusion_unet",
            "load_diffusion",
            "copy_controlnet_state",
            "checkpoint_controlnet",
            "load_controlnet",
            "scale_factor",
            "check_input",
            "ldm_sampler",
            "run",
            "evaluator",
            "initialize",
            "finalize",
        ),
        _BUNDLE,
    ),
    **dict.fromkeys(
        ("output_size_xy", "output_size_z", "spacing_xy", "spacing_z"),
        "read through output_size / spacing",
    ),
    "device": "device 'auto' (CUDA when there is one) is the default",
    "autoencoder_tp_num_splits": "splits the VAE's convolutions to save GPU memory; no effect on the result",
    "real_img_median_statistics_file": "the HU check uses MAISI's statistics shipped with maisi",
    **dict.fromkeys(
        ("diffusion_unet_train", "data_base_dir", "embedding_base_dir", "json_data_list", "tfevent_path"),
        _TRAINING,
    ),
    "existing_ckpt_filepath": "the checkpoint MAISI's training resumes from; its inference loads "
    "model_dir/model_filename",
    "modality_mapping_path": "maisi ships MAISI's modality mapping ($.modality takes its names)",
}
# Mask generation (Path A): MAISI key -> our key; the bundle spells the size table's key its own way.
MASK_GENERATOR = {
    "trained_mask_generation_autoencoder_path": "anatomy.mask_generator.autoencoder",
    "trained_mask_generation_diffusion_path": "anatomy.mask_generator.diffusion_unet",
    "all_anatomy_size_conditions_json": "anatomy.mask_generator.size_conditions",
    "all_anatomy_size_condtions_json": "anatomy.mask_generator.size_conditions",
}
# The keys of the image's mask: with nothing in them they are not needed in an image-only translation.
MASK_REQUEST = (
    "anatomy_list",
    "body_region",
    "controllable_anatomy_size",
    "trained_controlnet_path",
    "all_mask_files_json",
    "all_mask_files_base_dir",
)


@dataclass
class Translation:
    """The translated config and what became of every MAISI key.

    Attributes:
        config: the ``maisi.infer`` config (JSON data, paths relative to the output file's folder).
        translated: (MAISI key, our JSON path, value written).
        not_needed: (MAISI key, why no counterpart is needed).
        untranslated: (MAISI key, why it could not be translated): the user must decide.
        notes: other things the user should know (assumptions made).
    """

    config: dict[str, Any]
    translated: list[tuple[str, str, Any]] = field(default_factory=list)
    not_needed: list[tuple[str, str]] = field(default_factory=list)
    untranslated: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def put(self, maisi_key: str, path: str, value: Any) -> None:
        """Write ``value`` at our ``path`` (``a.b``) and record where ``maisi_key`` went."""
        *parents, last = path.split(".")
        node = self.config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        self.translated.append((maisi_key, f"$.{path}", value))

    def source_of(self, json_path: str) -> str | None:
        """The MAISI key our ``$.a.b`` came from (for messages about the translated config)."""

        def within(p: str) -> bool:
            return json_path == p or json_path.startswith((f"{p}.", f"{p}[", f"{p}/"))

        return next((k for k, p, _ in self.translated if within(p)), None)


class Unresolved(ValueError):
    """A bundle expression (code) that is not a plain reference or path join."""


class ChainTooLong(ValueError):
    """References that lead through more than :data:`MAX_CHAIN` keys before reaching a value."""


MAX_CHAIN = 100  # MAISI's configs follow one or two references; a longer chain is not a real config


def resolve(value: Any, data: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``value`` with bundle references to other keys of ``data`` replaced by their values; no code is run.

    A chain of references is followed in a loop (not by recursion), at most :data:`MAX_CHAIN` keys long.

    Raises:
        Unresolved: an expression other than ``"@key"`` or ``"$@key + 'text'"``, or a reference cycle.
        ChainTooLong: a chain of more than :data:`MAX_CHAIN` references.
    """
    chain, joins = list(seen), []  # joins: (expression, text appended), outermost first
    while isinstance(value, str) and value.startswith(("@", "$", "%")):
        ref, join = _REFERENCE.fullmatch(value), _PATH_JOIN.fullmatch(value)
        key = (ref or join).group(1) if (ref or join) else None
        if key is None or key not in data or key in chain:
            raise Unresolved(value)
        if len(chain) >= MAX_CHAIN:  # seen counts: lists of references recurse
            raise ChainTooLong(f"a chain of more than {MAX_CHAIN} @ references (through @{chain[0]})")
        if join is not None:
            joins.append((value, join.group(3)))
        chain.append(key)
        value = data[key]
    if isinstance(value, list):
        value = [resolve(v, data, tuple(chain)) for v in value]
    for expression, text in reversed(joins):  # innermost first
        if not isinstance(value, str):
            raise Unresolved(expression)
        value += text
    return value


def not_a_maisi_config(path: Path, why: str) -> InputError:
    return InputError(f"{path}: not a MAISI inference config: {why}")


def read_maisi_json(path: str | Path, what: str) -> dict[str, Any]:
    """A MAISI JSON file as an object (InputError naming the file otherwise)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise not_a_maisi_config(path, f"expected a JSON object ({what}), got a {type(data).__name__}")
    return data


def check_is_maisi_config(path: Path, data: dict[str, Any]) -> None:
    """Refuse our own configs and files without any MAISI inference key (InputError)."""
    if "preset" in data or "checkpoints" in data:
        raise InputError(
            f"{path} is a maisi config already ($.preset / $.checkpoints); "
            f"check it with: python -m maisi.config validate {path} --kind infer"
        )
    if not any(key in data for key in SIGNATURE):
        raise not_a_maisi_config(path, f"it has none of MAISI's inference keys ({', '.join(SIGNATURE)})")


@dataclass(frozen=True)
class Places:
    """Where paths point: MAISI's working folders in, the translated config's folder out."""

    maisi_root: Path  # the folder MAISI ran in: its relative paths start there
    data_root: Path  # where MAISI v2 puts paths containing "datasets/" ($MONAI_DATA_DIRECTORY)
    weights_dir: Path  # maisi.download's --dest, for what the MAISI files do not name
    output_dir: Path  # the translated config's folder: its relative paths start there

    def maisi_path(self, value: str) -> Path:
        root = self.data_root if "datasets/" in value else self.maisi_root
        return (root / Path(value).expanduser()).resolve()

    def ours(self, path: Path) -> str:
        """``path`` as the config names it: relative to its folder (absolute if only / is shared)."""
        if os.path.commonpath([path, self.output_dir]) == os.path.sep:
            return str(path)
        return os.path.relpath(path, self.output_dir)


def literal(data: dict[str, Any], key: str, path: Path) -> Any:
    """``data[key]`` with bundle references resolved; an expression is explained (InputError)."""
    try:
        return resolve(data[key], data)
    except ChainTooLong as err:
        raise InputError(f"{path}: $.{key}: {err}; replace it with its value and translate again") from None
    except Unresolved as err:
        raise InputError(
            f"{path}: $.{key} holds the bundle expression {str(err)!r}; maisi does not evaluate code in "
            "configs. "
            f'Replace it with its value (e.g. "{key}": [256, 256, 128]) and translate again'
        ) from None


def check_regions(regions: list[Any], path: Path) -> None:
    bad = []
    for name in regions:
        if not isinstance(name, str) or name.strip().lower() not in REGION_INDEX:
            hints = difflib.get_close_matches(str(name).strip().lower(), list(REGION_INDEX), n=1)
            bad.append(f"{name!r}" + (f" (did you mean {hints[0]!r}?)" if hints else ""))
    if bad:
        raise InputError(
            f"{path}: $.body_region: unknown region {', '.join(bad)}; known: {', '.join(REGION_INDEX)}"
        )


def check_anatomy(names: list[Any], label_dict: dict[str, Any], source: str, path: Path) -> None:
    bad = []
    for name in names:
        if not isinstance(name, str) or name not in label_dict:
            hints = difflib.get_close_matches(str(name), list(label_dict), n=1)
            bad.append(f"{name!r}" + (f" (did you mean {hints[0]!r}?)" if hints else ""))
    if bad:
        raise InputError(f"{path}: $.anatomy_list: {', '.join(bad)} not in the label dictionary {source}")


def modality_name(value: Any) -> str | None:
    """Our name for MAISI's modality code or name; None when MAISI's mapping has none."""
    codes: dict[str, int] = load_json("maisi_modality_mapping.json")
    if isinstance(value, int) and not isinstance(value, bool):
        return next((name for name, code in codes.items() if code == value), None)
    return value if isinstance(value, str) and value in codes else None


def is_mr(value: Any) -> bool:
    """Whether MAISI's modality code or name is an MR one (codes 8 and up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value >= FIRST_MR_CODE
    return isinstance(value, str) and value.startswith("mri")


def released_files(preset: str) -> dict[str, str]:
    """The files maisi.download fetches for ``preset``, by our key, as paths under its --dest."""
    variant = load_json("released_weights.json")["variants"][VARIANT[preset]]
    names = [Path(f["path"]).name for f in variant["files"]]
    prefixes = {
        "checkpoints.autoencoder": "autoencoder",
        "checkpoints.diffusion_unet": "diff_unet",
        "checkpoints.controlnet": "controlnet",
        "anatomy.mask_generator.autoencoder": "mask_generation_autoencoder",
        "anatomy.mask_generator.diffusion_unet": "mask_generation_diffusion",
    }
    out = {ours: next((n for n in names if n.startswith(p)), None) for ours, p in prefixes.items()}
    datasets = {Path(f["path"]).name: f["save_as"] for f in variant.get("datasets", [])}
    out["anatomy.mask_database"] = next((v for k, v in datasets.items() if "candidate_masks" in k), None)
    out["anatomy.mask_generator.size_conditions"] = datasets.get("all_anatomy_size_conditions.json")
    out["anatomy.mask_root"] = variant.get("mask_archive", {}).get("extract_to")
    return {ours: path for ours, path in out.items() if path}
