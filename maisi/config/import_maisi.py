"""Translate a MAISI inference config into a ``maisi.infer`` config (anatomy mode).

Reads what MAISI users have: ``config_infer*.json`` of NV-Generate-CTMR or the MONAI tutorials
(optionally with the ``environment_*.json`` that names the weights and the mask database), or the
model-zoo bundle ``maisi_ct_generative``'s ``configs/inference.json``. Every key ends in one of three
lists: translated (with the key of ours it became), not needed (our presets and defaults already do
what it does) and NOT translated (it changes the result and we have no counterpart: the user decides).

Bundle configs hold code (``"$torch.device(...)"``); nothing is evaluated. Two forms that are plain data are
resolved: a reference ``"@key"`` to another key and a path join ``"$@key + '/file.pt'"``.

Pure: JSON in, JSON out (no torch, MONAI or numpy), like the rest of :mod:`maisi.config`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maisi.config.loader import read_json
from maisi.errors import InputError
from maisi.options import REGION_INDEX
from maisi.resources import load_json

PRESETS = ("maisi-ct-rflow", "maisi-ct-ddpm")
VARIANT = {
    "maisi-ct-rflow": "rflow-ct",
    "maisi-ct-ddpm": "ddpm-ct",
}  # maisi.download's variant of a preset
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
)
_REFERENCE = re.compile(r"@(\w+)")
_PATH_JOIN = re.compile(r"""\$@(\w+)\s*\+\s*(['"])([^'"]*)\2""")

_NETWORKS = "a network definition: the preset builds the networks (MONAI classes, the released arguments)"
_PATH_A = "used by mask generation (MAISI's Path A) only; the translated config retrieves masks (Path B)"
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
            "mask_generation_num_inference_steps",
            "mask_generation_cfg_guidance_scale",
            "trained_mask_generation_autoencoder_path",
            "trained_mask_generation_diffusion_path",
            "all_anatomy_size_conditions_json",
            "all_anatomy_size_condtions_json",  # the bundle's spelling
            "label_dict_remap_json",
            "checkpoint_mask_generation_autoencoder",
            "checkpoint_mask_generation_diffusion_unet",
            "load_mask_generation_autoencoder",
            "load_mask_generation_diffusion",
        ),
        _PATH_A,
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
}


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


def resolve(value: Any, data: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``value`` with bundle references to other keys of ``data`` replaced by their values; no code is run.

    Raises:
        Unresolved: an expression other than ``"@key"`` or ``"$@key + 'text'"``, or a reference cycle.
    """
    if isinstance(value, list):
        return [resolve(v, data, seen) for v in value]
    if not isinstance(value, str) or not value.startswith(("@", "$", "%")):
        return value
    ref, join = _REFERENCE.fullmatch(value), _PATH_JOIN.fullmatch(value)
    key = (ref or join).group(1) if (ref or join) else None
    if key is None or key not in data or key in seen:
        raise Unresolved(value)
    target = resolve(data[key], data, (*seen, key))
    if join is None:
        return target
    if not isinstance(target, str):
        raise Unresolved(value)
    return target + join.group(3)


def _not_a_maisi_config(path: Path, why: str) -> InputError:
    return InputError(f"{path}: not a MAISI inference config: {why}")


def read_maisi_json(path: str | Path, what: str) -> dict[str, Any]:
    """A MAISI JSON file as an object (InputError naming the file otherwise)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise _not_a_maisi_config(path, f"expected a JSON object ({what}), got a {type(data).__name__}")
    return data


def check_is_maisi_config(path: Path, data: dict[str, Any]) -> None:
    """Refuse our own configs and files without any MAISI inference key (InputError)."""
    if "preset" in data or "checkpoints" in data:
        raise InputError(
            f"{path} is a maisi config already ($.preset / $.checkpoints); "
            f"check it with: python -m maisi.config validate {path} --kind infer"
        )
    if not any(key in data for key in SIGNATURE):
        raise _not_a_maisi_config(path, f"it has none of MAISI's inference keys ({', '.join(SIGNATURE)})")


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


def _literal(data: dict[str, Any], key: str, path: Path) -> Any:
    """``data[key]`` with bundle references resolved; an expression is explained (InputError)."""
    try:
        return resolve(data[key], data)
    except Unresolved as err:
        raise InputError(
            f"{path}: $.{key} holds the bundle expression {str(err)!r}; maisi does not evaluate code in "
            "configs. "
            f'Replace it with its value (e.g. "{key}": [256, 256, 128]) and translate again'
        ) from None


def _check_regions(regions: list[Any], path: Path) -> None:
    bad = []
    for name in regions:
        if not isinstance(name, str) or name.strip().lower() not in REGION_INDEX:
            hints = difflib.get_close_matches(str(name).strip().lower(), list(REGION_INDEX), n=1)
            bad.append(f"{name!r}" + (f" (did you mean {hints[0]!r}?)" if hints else ""))
    if bad:
        raise InputError(
            f"{path}: $.body_region: unknown region {', '.join(bad)}; known: {', '.join(REGION_INDEX)}"
        )


def _check_anatomy(names: list[Any], label_dict: dict[str, Any], source: str, path: Path) -> None:
    bad = []
    for name in names:
        if not isinstance(name, str) or name not in label_dict:
            hints = difflib.get_close_matches(str(name), list(label_dict), n=1)
            bad.append(f"{name!r}" + (f" (did you mean {hints[0]!r}?)" if hints else ""))
    if bad:
        raise InputError(f"{path}: $.anatomy_list: {', '.join(bad)} not in the label dictionary {source}")


def _modality(value: Any, path: Path) -> str | None:
    """Our modality name for MAISI's code or name; None for a CT code with no name; MR refused."""
    codes = load_json("maisi_modality_mapping.json")
    names = {v: k for k, v in codes.items()}
    name = names.get(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (isinstance(name, str) and name.startswith("mri")) or (isinstance(value, int) and value >= 8):
        raise InputError(
            f"{path}: $.modality is {value!r} (MR): maisi generates CT only; MR configs cannot be translated"
        )
    return name if name in ("unknown", "ct", "ct_wo_contrast", "ct_contrast") else None


def _choose_preset(data: dict[str, Any], requested: str | None, t: Translation) -> str:
    """``--preset``, else what the weights' names or the bundle's scheduler say, else rectified flow."""
    if requested:
        return requested
    unet = data.get("trained_diffusion_path")
    hint = unet if isinstance(unet, str) else json.dumps(data.get("noise_scheduler", ""))
    for word, preset in (("ddpm", "maisi-ct-ddpm"), ("rflow", "maisi-ct-rflow")):
        if word in hint.lower():
            t.notes.append(f"preset {preset}: chosen from {hint!r}")
            return preset
    t.notes.append(
        "preset maisi-ct-rflow assumed (MAISI's default version, rflow-ct); pass --preset maisi-ct-ddpm "
        "for the DDPM model"
    )
    return "maisi-ct-rflow"


def _released_files(preset: str) -> dict[str, Any]:
    """The files maisi.download fetches for ``preset``: weights by role, and the mask database."""
    variant = load_json("released_weights.json")["variants"][VARIANT[preset]]
    names = [Path(f["path"]).name for f in variant["files"]]
    roles = {
        "autoencoder": "autoencoder",
        "diffusion_unet": "diff_unet",
        "controlnet": "controlnet",
    }
    weights = {role: next(n for n in names if n.startswith(prefix)) for role, prefix in roles.items()}
    database = next(f["save_as"] for f in variant.get("datasets", []) if "candidate_masks" in f["path"])
    archive = variant.get("mask_archive", {}).get("extract_to")
    return {"weights": weights, "database": database, "mask_root": archive}


# ---------------------------------------------------------------- the keys, group by group

_COPIED = {
    "num_output_samples": "num_samples",
    "num_inference_steps": "sampling.num_inference_steps",
    "anatomy_list": "anatomy.anatomy_list",
    "body_region": "anatomy.body_region",
}
_PATHS = {
    "trained_autoencoder_path": "checkpoints.autoencoder",
    "trained_diffusion_path": "checkpoints.diffusion_unet",
    "trained_controlnet_path": "checkpoints.controlnet",
    "all_mask_files_json": "anatomy.mask_database",
    "all_mask_files_base_dir": "anatomy.mask_root",
    "output_dir": "output.dir",
}
# The keys of ours that hold paths: (section or "", key).
PATH_KEYS = (
    *(tuple(path.split(".")) for path in _PATHS.values()),
    ("", "label_dict"),
)
_ORDER = (
    "preset",
    "checkpoints",
    "anatomy",
    "output_size",
    "spacing",
    "modality",
    "label_dict",
    "sampling",
    "decoding",
    "num_samples",
    "seed",
    "output",
)


@dataclass
class _Job:
    """One translation: the merged MAISI keys, where they came from, and what is done with them."""

    data: dict[str, Any]
    origin: dict[str, Path]
    places: Places
    t: Translation
    source: Path  # the MAISI config itself
    done: set[str] = field(default_factory=set)

    def value(self, key: str) -> Any:
        self.done.add(key)
        return _literal(self.data, key, self.origin[key])

    def maybe(self, key: str) -> tuple[bool, Any]:
        """(True, value) with references resolved, or (False, None) once named as untranslated."""
        self.done.add(key)
        try:
            return True, resolve(self.data[key], self.data)
        except Unresolved as err:
            self.refuse(
                key,
                f"the bundle expression {str(err)!r} is code, which maisi does not evaluate",
            )
            return False, None

    def skip(self, key: str, why: str) -> None:
        self.done.add(key)
        self.t.not_needed.append((key, why))

    def refuse(self, key: str, why: str) -> None:
        self.done.add(key)
        self.t.untranslated.append((key, why))


def _copy_plain_keys(job: _Job) -> None:
    for key, ours in _COPIED.items():
        ok, value = job.maybe(key) if key in job.data else (False, None)
        if ok:
            job.t.put(key, ours, value)
    if isinstance(job.t.config.get("anatomy", {}).get("body_region"), list):
        _check_regions(job.t.config["anatomy"]["body_region"], job.origin["body_region"])
    for key in ("output_size", "spacing"):
        if key not in job.data:
            raise InputError(
                f"{job.source}: $.{key} is missing; MAISI's inference configs "
                "always set it and maisi's anatomy mode needs it"
            )
        job.t.put(key, key, job.value(key))
    ok, seed = job.maybe("random_seed") if "random_seed" in job.data else (False, None)
    if ok:
        if seed is None:
            job.refuse(
                "random_seed",
                "null (a new random seed every run) has no counterpart: maisi runs are reproducible; "
                "the config keeps seed 0 (maisi.infer --seed N draws others)",
            )
        else:
            job.t.put("random_seed", "seed", seed)


def _copy_conditional_keys(job: _Job) -> None:
    """Keys whose MAISI default is what maisi does anyway; any other value cannot be translated."""
    defaults = {
        "controllable_anatomy_size": (
            [],
            "empty: masks are retrieved from the database, as here",
        ),
        "cfg_guidance_scale": (0, "0: no classifier-free guidance, as here"),
        "controllable_demographics": (
            None,
            "null: no demographic conditioning, as here",
        ),
    }
    refusals = {
        "controllable_anatomy_size": "selects mask generation (MAISI's Path A), which maisi does not have "
        "yet; "
        "the translated config retrieves database masks holding anatomy_list instead",
        "cfg_guidance_scale": "classifier-free guidance is not available in maisi.infer; the config samples "
        "without it (scale 0)",
        "controllable_demographics": "demographic conditioning has no counterpart in maisi",
    }
    for key, (default, why) in defaults.items():
        ok, value = job.maybe(key) if key in job.data else (False, None)
        if ok:
            if value == default:
                job.skip(key, why)
            else:
                job.refuse(key, f"{json.dumps(value)}: {refusals[key]}")


def _copy_modality_and_formats(job: _Job) -> None:
    ok, value = job.maybe("modality") if "modality" in job.data else (False, None)
    if ok:
        name = _modality(value, job.origin["modality"])
        if name is None:
            job.refuse(
                "modality",
                f"{value!r} has no name in MAISI's modality mapping; 'ct' is used",
            )
        else:
            job.t.put("modality", "modality", name)
    formats = {}
    for key in ("image_output_ext", "label_output_ext"):
        ok, value = job.maybe(key) if key in job.data else (False, None)
        if ok:
            formats[key] = value.lstrip(".") if isinstance(value, str) else value
    image = formats.get("image_output_ext", formats.get("label_output_ext"))
    for key, fmt in formats.items():
        if fmt not in FORMATS:
            job.refuse(
                key,
                f"{fmt!r} is not one of maisi's formats ({', '.join(FORMATS)}); nii.gz is used",
            )
        elif fmt != image:
            job.refuse(key, f"image and mask are written in one format here ({image})")
        elif "format" in job.t.config.get("output", {}):
            job.skip(key, f"the same format as image_output_ext ({fmt})")
        else:
            job.t.put(key, "output.format", fmt)


def _copy_decoding(job: _Job) -> None:
    """MAISI decodes latents with MONAI's sliding window; ours is the same method under the same settings."""
    keys = {
        "autoencoder_sliding_window_infer_size": "sw_roi_size",
        "autoencoder_sliding_window_infer_overlap": "sw_overlap",
    }
    resolved = [(key, *job.maybe(key)) for key in keys if key in job.data]
    if not any(ok for _, ok, _ in resolved):
        return
    job.t.config.setdefault("decoding", {})["method"] = "sliding_window"
    for key, ok, value in resolved:
        if ok:
            job.t.put(key, f"decoding.{keys[key]}", value)
    job.t.notes.append(
        "decoding.method 'sliding_window' reproduces MAISI's approximate tiled decode; "
        "maisi's default 'tiled' "
        "is exact with bounded memory (decoding.memory_budget_mb): consider switching"
    )


def _copy_paths(job: _Job) -> None:
    for key, ours in _PATHS.items():
        if key not in job.data:
            continue
        ok, value = job.maybe(key)
        if not ok:
            continue
        if not isinstance(value, str):
            job.refuse(key, f"{value!r} is not a path")
            continue
        path = job.places.maisi_path(value)
        job.t.put(key, ours, job.places.ours(path))
        if ours != "output.dir" and not path.exists():
            job.t.notes.append(f"$.{ours}: {path} does not exist (yet)")


def _copy_label_dict(job: _Job) -> dict[str, Any] | None:
    """``label_dict_json`` -> ``$.label_dict`` (null when MAISI's own); the dictionary if readable."""
    packaged = load_json("maisi_label_dict.json")
    if "label_dict_json" not in job.data:
        return packaged
    ok, value = job.maybe("label_dict_json")
    if not ok:
        return None
    if not isinstance(value, str):
        job.refuse(
            "label_dict_json",
            f"{value!r} is not a path; $.label_dict stays null (MAISI's)",
        )
        return packaged
    path = job.places.maisi_path(value)
    try:
        label_dict = read_json(path)
    except InputError as err:  # MAISI's own file most of the time: keep the one maisi ships
        why = str(err).splitlines()[-1].split(": ")[-1]
        job.refuse(
            "label_dict_json",
            f"{path} cannot be read ({why}); $.label_dict stays null (MAISI's dictionary, shipped with "
            "maisi): set it to your copy if yours differs",
        )
        return packaged
    if label_dict == packaged:
        job.skip(
            "label_dict_json",
            "MAISI's label dictionary, which maisi ships ($.label_dict null)",
        )
        return packaged
    job.t.put("label_dict_json", "label_dict", job.places.ours(path))
    return label_dict if isinstance(label_dict, dict) else None


def _fill_released_defaults(job: _Job) -> None:
    """What the MAISI files do not name: the released files where maisi.download puts them."""
    preset = job.t.config["preset"]
    released = _released_files(preset)
    dest = job.places.weights_dir
    how = f"python -m maisi.download --variant {VARIANT[preset]} --dest {dest}"
    wanted = {f"checkpoints.{role}": dest / name for role, name in released["weights"].items()}
    wanted["anatomy.mask_database"] = dest / released["database"]
    if released["mask_root"]:
        wanted["anatomy.mask_root"] = dest / released["mask_root"]
    for ours, path in wanted.items():
        section, key = ours.split(".")
        if key not in job.t.config.get(section, {}):
            job.t.config.setdefault(section, {})[key] = job.places.ours(path)
            extra = " --with-mask-archive" if ours == "anatomy.mask_root" else ""
            job.t.notes.append(f"$.{ours}: {job.places.ours(path)} (released; {how}{extra})")


def translate(
    config_path: str | Path,
    places: Places,
    *,
    environment: str | Path | None = None,
    preset: str | None = None,
) -> Translation:
    """Translate a MAISI inference config (and its environment file) into a ``maisi.infer`` config.

    Args:
        config_path: ``config_infer*.json`` (NV-Generate-CTMR, MONAI tutorials) or the bundle's
            ``inference.json``.
        places: where MAISI's relative paths start and where the translated config will be written.
        environment: MAISI's ``environment_*.json`` (weights, mask database, output folder); its keys yield to
            the config's, as in MAISI's scripts.
        preset: ``maisi-ct-rflow`` or ``maisi-ct-ddpm``; None: from the weights' names or the
            bundle's scheduler.

    Returns:
        The translation; its ``config`` still has to pass the loader (:func:`maisi.config.load_config`).

    Raises:
        InputError: not a MAISI inference config (not JSON, not an object, ours, none of its keys), an
            output_size or spacing that is missing or code, an MR modality, unknown region or anatomy names.
    """
    config_path = Path(config_path)
    data = read_maisi_json(config_path, "a MAISI config_infer.json or the bundle's inference.json")
    check_is_maisi_config(config_path, data)
    env: dict[str, Any] = {}
    if environment is not None:
        env = read_maisi_json(environment, "a MAISI environment_*.json")
    origin = {
        **dict.fromkeys(env, Path(environment or "")),
        **dict.fromkeys(data, config_path),
    }
    job = _Job({**env, **data}, origin, places, Translation(config={}), config_path)
    job.t.config["preset"] = _choose_preset(job.data, preset, job.t)
    _copy_plain_keys(job)
    _copy_conditional_keys(job)
    _copy_modality_and_formats(job)
    _copy_decoding(job)
    _copy_paths(job)
    label_dict = _copy_label_dict(job)
    if label_dict is not None and isinstance(job.t.config.get("anatomy", {}).get("anatomy_list"), list):
        where = job.t.config.get("label_dict") or "(MAISI's, shipped with maisi)"
        _check_anatomy(
            job.t.config["anatomy"]["anatomy_list"],
            label_dict,
            where,
            origin["anatomy_list"],
        )
    _fill_released_defaults(job)
    for key in job.data:
        if key in job.done:
            continue
        if key in NOT_NEEDED:
            job.skip(key, NOT_NEEDED[key])
        else:
            job.refuse(key, "no counterpart in maisi.infer")
    steps = job.t.config.get("sampling", {}).get("num_inference_steps")
    if job.t.config["preset"] == "maisi-ct-ddpm" and isinstance(steps, int) and steps < 1000:
        job.t.notes.append(
            f"{steps} DDPM steps: MAISI's DDPM model was sampled with 1000; with fewer, consider "
            '"sampling": {"scheduler": "ddim"}'
        )
    job.t.config = {k: job.t.config[k] for k in _ORDER if k in job.t.config}
    return job.t
