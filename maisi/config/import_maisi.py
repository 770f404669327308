"""Translate a MAISI inference config into a ``maisi.infer`` config.

Reads what MAISI users have: ``config_infer*.json`` of NV-Generate-CTMR or the MONAI tutorials
(optionally with the ``environment_*.json`` that names the weights and the mask database), the
model-zoo bundle ``maisi_ct_generative``'s ``configs/inference.json``, or NV-Generate-CTMR's image-only
``config_maisi_diff_model_*.json`` (its ``diffusion_unet_inference`` block, with the
``environment_maisi_diff_model_*.json``). Every key ends in one of three lists: translated (with the key
of ours it became), not needed (our presets and defaults already do what it does) and NOT translated (it
changes the result and we have no counterpart: the user decides).

What the translation generates: a CT and its mask retrieved from the database (anatomy mode, MAISI's Path
B), a mask generated from ``controllable_anatomy_size`` (Path A), or an image only (the diff-model configs,
and every MR config: MAISI released no MR ControlNet). The MR variant is told by the weights' file names
(``diff_unet_3d_rflow-mr.pt``, ``diff_unet_3d_rflow-mr-brain_v1.pt``) or ``--preset``.

Bundle configs hold code (``"$torch.device(...)"``); nothing is evaluated. Two forms that are plain data are
resolved: a reference ``"@key"`` to another key and a path join ``"$@key + '/file.pt'"``.

Pure: JSON in, JSON out (no torch, MONAI or numpy), like the rest of :mod:`maisi.config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maisi.config.import_maisi_keys import (
    FORMATS,
    INNER,
    MASK_GENERATOR,
    MASK_REQUEST,
    MR_GUIDANCE,
    MR_PRESETS,
    NO_MASK,
    NOT_NEEDED,
    PATH_A,
    PATH_B,
    PRESETS,
    VARIANT,
    ChainTooLong,
    Places,
    Translation,
    Unresolved,
    check_anatomy,
    check_is_maisi_config,
    check_regions,
    is_mr,
    literal,
    modality_name,
    not_a_maisi_config,
    read_maisi_json,
    released_files,
    resolve,
)
from maisi.config.loader import read_json
from maisi.errors import InputError
from maisi.options import BODY_REGIONS
from maisi.resources import load_json

__all__ = [
    "PATH_KEYS",
    "PRESETS",
    "Places",
    "Translation",
    "Unresolved",
    "resolve",
    "translate",
]

# Words of the weights' file names -> the preset (most specific first: rflow-mr-brain holds rflow-mr).
_HINTS = (
    ("rflow-mr-brain", "maisi-mr-brain-rflow"),
    ("rflow-mr", "maisi-mr-rflow"),
    ("ddpm", "maisi-ct-ddpm"),
    ("rflow", "maisi-ct-rflow"),
)


def _choose_preset(data: dict[str, Any], requested: str | None, t: Translation, source: Path) -> str:
    """``--preset``, else what the weights' names or the bundle's scheduler say, else rectified-flow CT.

    Raises:
        InputError: an MR modality whose variant nothing names (MAISI has two MR models).
    """
    if requested:
        return requested
    names = [data.get(k) for k in ("trained_diffusion_path", "model_filename", "existing_ckpt_filepath")]
    hint = next((n for n in names if isinstance(n, str)), json.dumps(data.get("noise_scheduler", "")))
    for word, preset in _HINTS:
        if word in hint.lower():
            t.notes.append(f"preset {preset}: chosen from {hint!r}")
            return preset
    modality = data.get("modality", data.get(f"{INNER}.modality"))
    if is_mr(modality):
        raise InputError(
            f"{source}: $.modality is {modality!r} (MR), but nothing names which of MAISI's MR models to use "
            "(no weights' file name says rflow-mr or rflow-mr-brain): pass --preset maisi-mr-rflow (MAISI's "
            "rflow-mr) or --preset maisi-mr-brain-rflow (rflow-mr-brain), or --environment with MAISI's "
            "environment file that names the weights"
        )
    t.notes.append(
        "preset maisi-ct-rflow assumed (MAISI's default version, rflow-ct); pass --preset maisi-ct-ddpm "
        "for the DDPM model"
    )
    return "maisi-ct-rflow"


# ---------------------------------------------------------------- the keys, group by group

_PATHS = {
    "trained_autoencoder_path": "checkpoints.autoencoder",
    "trained_diffusion_path": "checkpoints.diffusion_unet",
    "trained_controlnet_path": "checkpoints.controlnet",
    "all_mask_files_json": "anatomy.mask_database",
    "all_mask_files_base_dir": "anatomy.mask_root",
    "output_dir": "output.dir",
}
# The keys of ours that hold paths, as their parts.
PATH_KEYS = (
    *(tuple(path.split(".")) for path in (*_PATHS.values(), *MASK_GENERATOR.values())),
    ("label_dict",),
)
_ORDER = (
    "preset",
    "checkpoints",
    "anatomy",
    "output_size",
    "spacing",
    "body_region",
    "modality",
    "label_dict",
    "sampling",
    "decoding",
    "num_samples",
    "seed",
    "output",
)
CHANNEL_MAP = "maisi_label_dict_124_to_132.json"  # packaged in maisi/resources
_MASK_PRESET = (
    "part of the mask generator: its preset ($.anatomy.mask_generator.preset, maisi-mask-ddpm for MAISI's "
    "files) builds and runs it as MAISI does"
)
RETRIEVE, GENERATE, IMAGE = "retrieve", "generate", "image"  # what the translated config generates


@dataclass
class _Job:
    """One translation: the merged MAISI keys, where they came from, and what is done with them."""

    data: dict[str, Any]
    origin: dict[str, Path]
    places: Places
    t: Translation
    source: Path  # the MAISI config itself
    mode: str = RETRIEVE
    image_only_why: str = NO_MASK  # why the mask's keys are not translated (mode IMAGE)
    done: set[str] = field(default_factory=set)

    def name(self, key: str) -> str | None:
        """The MAISI key holding ``key``'s setting: itself, or its copy in a diff-model config's block."""
        inner = f"{INNER}.{'dim' if key == 'output_size' else key}"
        return key if key in self.data else inner if inner in self.data else None

    def value(self, key: str) -> Any:
        self.done.add(key)
        return literal(self.data, key, self.origin[key])

    def maybe(self, key: str) -> tuple[bool, Any]:
        """(True, value) with references resolved, or (False, None) once named as untranslated."""
        self.done.add(key)
        try:
            return True, resolve(self.data[key], self.data)
        except ChainTooLong as err:
            raise InputError(
                f"{self.source}: $.{key}: {err}; replace it with its value and translate again"
            ) from None
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

    def has(self, path: str) -> bool:
        """Whether our config already holds ``a.b.c``."""
        node: Any = self.t.config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True


def _flatten_diff_model(data: dict[str, Any], source: Path) -> dict[str, Any]:
    """A diff-model config's ``diffusion_unet_inference`` block as keys ``diffusion_unet_inference.KEY``."""
    block = data.get(INNER)
    if INNER not in data:
        return data
    if not isinstance(block, dict):
        raise not_a_maisi_config(source, f"$.{INNER} is a {type(block).__name__}, not an object")
    rest = {k: v for k, v in data.items() if k != INNER}
    return {**rest, **{f"{INNER}.{k}": v for k, v in block.items()}}


def _copy_plain_keys(job: _Job) -> None:
    if "num_output_samples" in job.data:
        ok, value = job.maybe("num_output_samples")
        if ok:
            job.t.put("num_output_samples", "num_samples", value)
    steps = job.name("num_inference_steps")
    if steps:
        ok, value = job.maybe(steps)
        if ok:
            job.t.put(steps, "sampling.num_inference_steps", value)
    for key in ("output_size", "spacing"):
        name = job.name(key)
        if name is None:
            raise InputError(
                f"{job.source}: $.{key} is missing; MAISI's inference configs "
                "always set it and maisi needs it"
            )
        job.t.put(name, key, job.value(name))
    seed_key = job.name("random_seed")
    ok, seed = job.maybe(seed_key) if seed_key else (False, None)
    if ok:
        if seed is None:
            job.refuse(
                seed_key,
                "null (a new random seed every run) has no counterpart: maisi runs are reproducible; "
                "the config keeps seed 0 (maisi.infer --seed N draws others)",
            )
        else:
            job.t.put(seed_key, "seed", seed)


def _copy_mask_request(job: _Job) -> None:
    """anatomy_list / body_region (Path B) or controllable_anatomy_size (Path A); none for an image."""
    if job.mode == IMAGE:
        for key in MASK_REQUEST:
            ok, value = job.maybe(key) if key in job.data else (False, None)
            if ok and value in ([], None):
                job.skip(key, f"{json.dumps(value)}: nothing asked of a mask; {NO_MASK}")
            elif ok:
                job.refuse(key, f"{json.dumps(value)}: {job.image_only_why}")
        return
    sizes = "controllable_anatomy_size"
    if job.mode == GENERATE:
        job.t.put(sizes, f"anatomy.{sizes}", job.value(sizes))
        for key in ("anatomy_list", "body_region"):
            if key in job.data:
                job.skip(
                    key,
                    f"MAISI ignores it when {sizes} is given (the generated mask holds the organs named "
                    "there); maisi's config refuses it then",
                )
        return
    if sizes in job.data:
        ok, value = job.maybe(sizes)
        if ok and value == []:
            job.skip(sizes, "empty: masks are retrieved from the database, as here")
        elif ok:  # not a list (a list is Path A)
            job.refuse(sizes, f"{json.dumps(value)} is not a list of [name, size] pairs")
    for key in ("anatomy_list", "body_region"):
        ok, value = job.maybe(key) if key in job.data else (False, None)
        if ok:
            job.t.put(key, f"anatomy.{key}", value)
    if isinstance(job.t.config.get("anatomy", {}).get("body_region"), list):
        check_regions(job.t.config["anatomy"]["body_region"], job.origin["body_region"])


def _copy_guidance(job: _Job) -> None:
    """``cfg_guidance_scale`` -> ``$.sampling.guidance_scale`` (MAISI's paired and image-only both)."""
    preset = job.t.config["preset"]
    key = job.name("cfg_guidance_scale")
    ok, value = job.maybe(key) if key else (False, None)
    default = MR_GUIDANCE.get(preset)
    if ok and value == 0:
        job.skip(key, "0: no classifier-free guidance (maisi's default)")
    elif ok and preset == "maisi-ct-ddpm":
        job.refuse(
            key,
            f"{json.dumps(value)}: maisi guides only presets with a modality input (MAISI's DDPM UNet has "
            "none, so MAISI guided its ControlNet alone); the config samples without guidance (scale 0)",
        )
    elif ok:
        job.t.put(key, "sampling.guidance_scale", value)
    if default is not None and not job.t.config.get("sampling", {}).get("guidance_scale"):
        job.t.notes.append(
            f"no guidance: MAISI samples {VARIANT[preset]} with cfg_guidance_scale {default} (its "
            f"config_maisi_diff_model_{VARIANT[preset]}.json); without, the image does not commit to the "
            f'modality: consider "sampling": {{"guidance_scale": {default}}}'
        )
    if "controllable_demographics" in job.data:
        ok, value = job.maybe("controllable_demographics")
        if ok and value is None:
            job.skip("controllable_demographics", "null: no demographic conditioning, as here")
        elif ok:
            job.refuse(
                "controllable_demographics",
                f"{json.dumps(value)}: demographic conditioning has no counterpart in maisi",
            )


def _copy_modality(job: _Job) -> None:
    """MAISI's modality code (or name) -> ours; it must fit the variant (CT codes for CT, MR for MR)."""
    preset = job.t.config["preset"]
    key = job.name("modality")
    mr = preset in MR_PRESETS
    if key is None:
        if mr:
            raise InputError(
                f"{job.source}: $.modality is missing; MAISI's MR variant {VARIANT[preset]} needs an MR "
                "code (e.g. 9, mri_t1)"
            )
        return
    ok, value = job.maybe(key)
    if not ok:
        return
    name = modality_name(value)
    if name is not None and name != "unknown" and is_mr(name) != mr:
        kind, family, wanted = ("an MR", "CT", "a CT") if is_mr(name) else ("a CT", "MR", "an MR")
        raise InputError(
            f"{job.origin[key]}: $.{key} is {value!r} ({name}, {kind} modality), but the translation uses "
            f"MAISI's {family} model {VARIANT[preset]} (preset {preset}); give the matching weights, "
            f"--preset, or {wanted} modality code"
        )
    if name is None and mr:
        raise InputError(
            f"{job.origin[key]}: $.{key} is {value!r}, not in MAISI's modality mapping; MAISI's MR variant "
            f"{VARIANT[preset]} needs an MR code (e.g. 9, mri_t1)"
        )
    if name is None:
        job.refuse(key, f"{value!r} has no name in MAISI's modality mapping; 'ct' is used")
    else:
        job.t.put(key, "modality", name)


def _copy_formats(job: _Job) -> None:
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
    if "output_prefix" in job.data:
        ok, value = job.maybe("output_prefix")
        if ok:
            job.t.put("output_prefix", "output.prefix", value)


def _copy_body_region_index(job: _Job) -> None:
    """A diff-model config's one-hot top/bottom region vectors: DDPM's body region, ignored by rflow."""
    keys = [job.name(k) for k in ("top_region_index", "bottom_region_index")]
    if not all(keys):
        for key in filter(None, keys):
            job.skip(key, "needs both region vectors")
        return
    if job.t.config["preset"] != "maisi-ct-ddpm":
        for key in keys:
            job.skip(
                key,
                "rectified-flow presets take no body region (MAISI: include_top_region_index_input false)",
            )
        return
    regions = {}
    for key, which in zip(keys, ("top", "bottom")):
        ok, value = job.maybe(key)
        hot = [i for i, v in enumerate(value) if v] if ok and isinstance(value, list) else []
        if ok and (len(value) != len(BODY_REGIONS) or len(hot) != 1):
            job.refuse(key, f"{json.dumps(value)} is not one-hot over {len(BODY_REGIONS)} regions")
        elif ok:
            regions[which] = BODY_REGIONS[hot[0]]
    if len(regions) == 2:
        job.t.put(f"{keys[0]}+bottom_region_index", "body_region", regions)


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


def _path_keys(job: _Job) -> dict[str, str]:
    """MAISI path key -> ours, for what this translation uses; the others are named as not needed."""
    paths = dict(_PATHS)
    unused: dict[str, str] = {}
    if job.mode != RETRIEVE:
        why = PATH_B if job.mode == GENERATE else NO_MASK
        unused.update(dict.fromkeys(("all_mask_files_json", "all_mask_files_base_dir"), why))
    if job.mode == IMAGE:
        unused["trained_controlnet_path"] = NO_MASK
    if job.mode == GENERATE:
        paths.update(MASK_GENERATOR)
        if "mask_generation_num_inference_steps" in job.data:
            steps = job.value("mask_generation_num_inference_steps")
            job.t.put(
                "mask_generation_num_inference_steps", "anatomy.mask_generator.num_inference_steps", steps
            )
            if isinstance(steps, int) and steps != 1000:
                # MAISI samples the mask with MONAI's DDPMScheduler, which cannot stride: its masks at fewer
                # steps come from a still-noisy latent. DDIM takes such a count; DDPM here would be refused.
                job.t.put("mask_generation_num_inference_steps", "anatomy.mask_generator.scheduler", "ddim")
                job.t.notes.append(
                    f"$.anatomy.mask_generator.scheduler: ddim, for MAISI's {steps} mask DDPM steps (MONAI's "
                    "DDPMScheduler cannot stride: MAISI's masks at fewer than 1000 steps start from a noisy "
                    "latent)"
                )
    else:
        why = PATH_A if job.mode == RETRIEVE else NO_MASK
        unused.update(dict.fromkeys((*MASK_GENERATOR, "mask_generation_num_inference_steps"), why))
    for key, why in unused.items():
        paths.pop(key, None)
        if key in job.data and key not in job.done:  # the mask request's keys are judged already
            job.skip(key, why)
    return paths


def _copy_paths(job: _Job) -> None:
    for key, ours in _path_keys(job).items():
        if key not in job.data or key in job.done:
            continue
        ok, value = job.maybe(key)
        if not ok:
            continue
        if value is None:
            job.skip(key, "null in MAISI's file: not used")
            continue
        if not isinstance(value, str):
            job.refuse(key, f"{value!r} is not a path")
            continue
        path = job.places.maisi_path(value)
        job.t.put(key, ours, job.places.ours(path))
        if ours != "output.dir" and not path.exists():
            job.t.notes.append(f"$.{ours}: {path} does not exist (yet)")
    if "model_filename" in job.data:  # a diff-model environment: MAISI loads model_dir/model_filename
        ok, name = job.maybe("model_filename")
        folder = job.value("model_dir") if "model_dir" in job.data else "."
        if ok and isinstance(name, str) and isinstance(folder, str):
            path = job.places.maisi_path(f"{folder}/{name}")
            job.t.put("model_filename", "checkpoints.diffusion_unet", job.places.ours(path))
            if "model_dir" in job.data:
                job.skip("model_dir", "joined with model_filename into $.checkpoints.diffusion_unet")
            if not path.exists():
                job.t.notes.append(f"$.checkpoints.diffusion_unet: {path} does not exist (yet)")
        elif ok:
            job.refuse("model_filename", f"{name!r} in {folder!r} is not a path")


def _copy_label_dict(job: _Job) -> dict[str, Any] | None:
    """``label_dict_json`` -> ``$.label_dict`` (null when MAISI's own); the dictionary if readable."""
    packaged = load_json("maisi_label_dict.json")
    if "label_dict_json" not in job.data:
        return packaged
    if job.mode == IMAGE:
        job.skip("label_dict_json", NO_MASK)
        return None
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


def _check_channel_map(job: _Job) -> None:
    """``label_dict_remap_json`` (decoder channel -> MAISI id) of Path A: maisi's mask presets use MAISI's."""
    key = "label_dict_remap_json"
    if job.mode != GENERATE or key not in job.data:
        return
    ok, value = job.maybe(key)
    if not ok:
        return
    if not isinstance(value, str):
        job.refuse(key, f"{value!r} is not a path")
        return
    path = job.places.maisi_path(value)
    try:
        mapping = read_json(path)
    except InputError as err:
        why = str(err).splitlines()[-1].split(": ")[-1]
        job.skip(key, f"{path} cannot be read ({why}); {_MASK_PRESET}, with MAISI's map (shipped with maisi)")
        return
    if mapping == load_json(CHANNEL_MAP):
        job.skip(key, f"MAISI's channel -> id map, which maisi ships; {_MASK_PRESET}")
    else:  # another mask model's channels: decoding it with MAISI's map would mislabel every organ
        job.refuse(
            key,
            f"{path} differs from MAISI's channel -> id map ({CHANNEL_MAP}), which maisi's mask presets "
            "decode with; a mask generator with other channels has no counterpart",
        )


def _fill_released_defaults(job: _Job) -> None:
    """What the MAISI files do not name: the released files where maisi.download puts them."""
    preset = job.t.config["preset"]
    dest = job.places.weights_dir
    how = f"python -m maisi.download --variant {VARIANT[preset]} --dest {dest}"
    wanted = ["checkpoints.autoencoder", "checkpoints.diffusion_unet"]
    if job.mode != IMAGE:
        wanted.append("checkpoints.controlnet")
    if job.mode == RETRIEVE:
        wanted += ["anatomy.mask_database", "anatomy.mask_root"]
    if job.mode == GENERATE:
        wanted += [
            f"anatomy.mask_generator.{k}" for k in ("autoencoder", "diffusion_unet", "size_conditions")
        ]
    released = released_files(preset)
    for ours in wanted:
        if ours not in released or job.has(ours):
            continue
        *parents, key = ours.split(".")
        node = job.t.config
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = job.places.ours(dest / released[ours])
        extra = " --with-mask-archive" if ours == "anatomy.mask_root" else ""
        job.t.notes.append(f"$.{ours}: {node[key]} (released; {how}{extra})")


def translate(
    config_path: str | Path,
    places: Places,
    *,
    environment: str | Path | None = None,
    preset: str | None = None,
) -> Translation:
    """Translate a MAISI inference config (and its environment file) into a ``maisi.infer`` config.

    Args:
        config_path: ``config_infer*.json`` (NV-Generate-CTMR, MONAI tutorials), the bundle's
            ``inference.json`` or an image-only ``config_maisi_diff_model_*.json``.
        places: where MAISI's relative paths start and where the translated config will be written.
        environment: MAISI's ``environment_*.json`` (weights, mask database, output folder); its keys yield to
            the config's, as in MAISI's scripts.
        preset: one of :data:`PRESETS`; None: from the weights' names or the bundle's scheduler, else
            ``maisi-ct-rflow`` (an MR modality then needs a name or ``preset``).

    Returns:
        The translation; its ``config`` still has to pass the loader (:func:`maisi.config.load_config`).

    Raises:
        InputError: not a MAISI inference config (not JSON, not an object, ours, none of its keys), an
            output_size or spacing that is missing or code, a modality that does not fit the model (or an MR
            one whose model nothing names), unknown region or anatomy names.
    """
    config_path = Path(config_path)
    data = read_maisi_json(config_path, "a MAISI config_infer.json or the bundle's inference.json")
    check_is_maisi_config(config_path, data)
    data = _flatten_diff_model(data, config_path)
    env: dict[str, Any] = {}
    if environment is not None:
        env = read_maisi_json(environment, "a MAISI environment_*.json")
    origin = {
        **dict.fromkeys(env, Path(environment or "")),
        **dict.fromkeys(data, config_path),
    }
    job = _Job({**env, **data}, origin, places, Translation(config={}), config_path)
    job.t.config["preset"] = _choose_preset(job.data, preset, job.t, config_path)
    sizes = job.data.get("controllable_anatomy_size")
    if job.t.config["preset"] in MR_PRESETS:
        job.mode = IMAGE
        job.image_only_why = (
            "MAISI released no MR ControlNet (its environment_rflow-mr.json has trained_controlnet_path "
            "null), so the MR variants generate images only; the translated config generates an image "
            "without a mask"
        )
        job.t.notes.append(f"{job.t.config['preset']}: an image only (MAISI has no MR ControlNet)")
    elif any(key.startswith(f"{INNER}.") for key in job.data):
        job.mode = IMAGE  # MAISI's image-only script
    elif isinstance(sizes, list) and sizes:
        job.mode = GENERATE
    _copy_plain_keys(job)
    _copy_mask_request(job)
    _copy_modality(job)
    _copy_guidance(job)
    _copy_formats(job)
    _copy_body_region_index(job)
    _copy_decoding(job)
    _copy_paths(job)
    label_dict = _copy_label_dict(job)
    _check_channel_map(job)
    if label_dict is not None and isinstance(job.t.config.get("anatomy", {}).get("anatomy_list"), list):
        where = job.t.config.get("label_dict") or "(MAISI's, shipped with maisi)"
        check_anatomy(
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
            why = NOT_NEEDED[key]
            if why == PATH_A and job.mode != RETRIEVE:
                why = NO_MASK if job.mode == IMAGE else _MASK_PRESET
            job.skip(key, why)
        else:
            job.refuse(key, "no counterpart in maisi.infer")
    steps = job.t.config.get("sampling", {}).get("num_inference_steps")
    ddpm = job.t.config.get("sampling", {}).get("scheduler", "ddpm") == "ddpm"
    if job.t.config["preset"] == "maisi-ct-ddpm" and ddpm and isinstance(steps, int) and steps < 1000:
        # DDPM with fewer steps would be refused (see presets.check_sampler)
        job.t.put("num_inference_steps", "sampling.scheduler", "ddim")
        job.t.notes.append(
            f"$.sampling.scheduler: ddim, for MAISI's {steps} DDPM steps (MONAI's DDPMScheduler cannot "
            "stride, so MAISI's own images at fewer than 1000 steps start from a noisy latent)"
        )
    job.t.config = {k: job.t.config[k] for k in _ORDER if k in job.t.config}
    return job.t
