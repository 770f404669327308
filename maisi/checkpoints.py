"""Checkpoints: our self-describing format and the three layouts of the released MAISI weights.

Our format (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "maisi-checkpoint", "format_version": 1, "part": "diffusion_unet",
     "preset": "maisi-ct-rflow", "architecture": {...constructor args that shape the weights...},
     "state_dict": {...}, "scale_factor": 1.0 | None, "provenance": {...}}

Released MAISI layouts (read-only): a plain VAE state_dict; ``{"unet_state_dict", "scale_factor", ...}``;
``{"controlnet_state_dict", ...}``. Loading never unpickles code.

The mask-generation networks (:mod:`maisi.families.mask`) use the same format and layouts, under the parts
``mask_autoencoder`` and ``mask_diffusion_unet`` (so a CT network's checkpoint is never taken for a mask
network's): MAISI's ``mask_generation_autoencoder.pt`` is a plain state_dict and
``mask_generation_diffusion_unet.pt`` a ``{"unet_state_dict", "scale_factor"}`` dict.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import monai
import torch

import maisi
from maisi.atomic import atomic_path
from maisi.errors import CheckpointError
from maisi.families.ct import PARTS, PRESETS, Part, Preset
from maisi.families.mask import MaskPreset
from maisi.families.networks import RuntimeOptions, architecture_of, build_network
from maisi.files import SYMLINK_LOOP, is_symlink_loop, why_absent

log = logging.getLogger(__name__)

FORMAT = "maisi-checkpoint"
FORMAT_VERSION = 1
_RELEASED_KEYS: dict[str, Part] = {"unet_state_dict": "diffusion_unet", "controlnet_state_dict": "controlnet"}

SourceFormat = Literal["maisi", "released-vae", "released-unet", "released-controlnet"]
MaskCheckpointPart = Literal["mask_autoencoder", "mask_diffusion_unet"]
MASK_CHECKPOINT_PARTS: tuple[MaskCheckpointPart, ...] = ("mask_autoencoder", "mask_diffusion_unet")
AnyPart = Part | MaskCheckpointPart


def _network_part(part: AnyPart) -> Part:
    """The preset field of a checkpoint part: ``mask_autoencoder`` -> ``autoencoder`` (of a MaskPreset)."""
    return part.removeprefix("mask_")  # type: ignore[return-value]


def _architecture(preset: Preset | MaskPreset, part: AnyPart) -> dict[str, Any]:
    return architecture_of(preset, _network_part(part))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Weights:
    """Weights read from a checkpoint file, with what the file says about them."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    source_format: SourceFormat
    scale_factor: float | None
    preset: str | None  # ours only
    architecture: dict[str, Any] | None  # ours only
    scale_factor_source: str | None = None  # ours only: how the scale factor was found
    prediction_type: str | None = None  # ours only (LDM UNets): epsilon or v_prediction


_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv_mu.", "quant_conv_log_sigma.", "post_quant_conv.")


def _is_wrapped_vae(obj: dict) -> bool:
    """A dict whose ``unet_state_dict`` holds autoencoder tensors (names of AutoencoderKlMaisi's modules)."""
    inner = obj.get("unet_state_dict")
    return (
        isinstance(inner, dict)
        and len(inner) > 0
        and all(isinstance(k, str) and k.startswith(_VAE_PREFIXES) for k in inner)
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


# torch's weights_only unpickler names the callable or class it refused ("Unsupported global: GLOBAL print was
# not an allowed global", "unsupported GLOBAL posix.system whose module posix is blocked") or the object it
# would not build; its wording differs between torch versions, so it is matched loosely, case-insensitively.
_CODE_PATTERNS = (
    re.compile(r"\bGLOBAL\s+(\S+?)\.?(?:\s|$)", re.IGNORECASE),
    re.compile(r"call reduce for (?:unrecognized )?function (.+?)(?: which belongs to .*)?$", re.I | re.M),
    re.compile(r"(?:create new object|build) .*?but got (\S+)", re.IGNORECASE),
)


def code_in_pickle_error(message: str) -> str | None:
    """What torch's weights_only unpickler refused to run or build (e.g. ``posix.system``), or None when
    ``message`` is about something else (a corrupt or truncated file)."""
    for pattern in _CODE_PATTERNS:
        found = pattern.search(message)
        if found:
            return found.group(1).strip("`'\".,")
    return None


def _torch_load(path: Path, what: str, noun: str = "PyTorch checkpoint") -> Any:
    """``torch.load(weights_only=True)`` of ``path``.

    Raises:
        CheckpointError: (message starting with ``what``) the file holds code (refused, nothing run) or is not
            a PyTorch file at all (``noun`` says what was expected).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = code_in_pickle_error(str(e))
        if code is None:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{what}{path}: not a readable {noun} ({first})") from None
        raise CheckpointError(
            f"{what}{path}: refused: it holds code ({code}), not only weights; checkpoints are loaded with "
            "torch.load(weights_only=True), which never runs code from a file"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip/EOF/format errors all mean "not a checkpoint"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"{what}{path}: not a readable {noun} ({type(e).__name__}: {first})") from None


def _malformed(path: Path, layout: str, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed {layout} checkpoint: field '{field}' {problem}")


def _checked_state_dict(obj: dict, field: str, path: Path, layout: str) -> dict[str, torch.Tensor]:
    """``obj[field]`` when it is a non-empty dict of name -> tensor; CheckpointError naming the field else."""
    if field not in obj:
        raise _malformed(path, layout, field, "is missing")
    value = obj[field]
    if not isinstance(value, dict):
        raise _malformed(path, layout, field, f"has type {type(value).__name__}, expected a dict of tensors")
    if not value:
        raise _malformed(path, layout, field, "is empty, expected the network's tensors")
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in value.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        problem = f"holds entries that are not named tensors: {', '.join(bad[:3])}{more}"
        raise _malformed(path, layout, field, problem)
    return value


def _checked_scale_factor(obj: dict, path: Path, layout: str) -> float | None:
    """The ``scale_factor`` as a finite positive float (None when absent or null).

    A NaN, infinite, zero or negative factor would decode every latent to a blank or NaN image.
    """
    value = obj.get("scale_factor")
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            problem = f"is a {value.dtype} tensor of shape {list(value.shape)}, expected one real number"
            raise _malformed(path, layout, "scale_factor", problem)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problem = f"is {value!r} ({type(value).__name__}), expected a number"
        raise _malformed(path, layout, "scale_factor", problem)
    if not math.isfinite(value) or value <= 0:
        raise _malformed(path, layout, "scale_factor", f"is {value}, expected a finite number > 0")
    return float(value)


def _checked_optional(obj: dict, field: str, kind: type, path: Path) -> Any:
    """``obj[field]`` when it is null, absent or of type ``kind``; CheckpointError naming the field else."""
    value = obj.get(field)
    if value is not None and not isinstance(value, kind):
        problem = f"has type {type(value).__name__}, expected a {kind.__name__} or null"
        raise _malformed(path, FORMAT, field, problem)
    return value


def _read_ours(obj: dict, path: Path, part: AnyPart) -> Weights:
    """Our format, every field that loading uses checked."""
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _malformed(path, FORMAT, "format_version", f"is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: {FORMAT} format_version {version} is newer than this maisi "
            f"{maisi.__version__} reads ({FORMAT_VERSION}); update maisi"
        )
    holder = obj.get("part")
    if holder not in PARTS + MASK_CHECKPOINT_PARTS:
        known = list(PARTS + MASK_CHECKPOINT_PARTS)
        raise _malformed(path, FORMAT, "part", f"is {holder!r}, expected one of {known}")
    if holder != part:
        raise CheckpointError(f"{path}: holds a {holder} checkpoint, expected a {part} checkpoint")
    architecture = _checked_optional(obj, "architecture", dict, path)
    if architecture is not None and not all(isinstance(k, str) for k in architecture):
        raise _malformed(path, FORMAT, "architecture", "has keys that are not strings")
    return Weights(
        path,
        _checked_state_dict(obj, "state_dict", path, FORMAT),
        "maisi",
        _checked_scale_factor(obj, path, FORMAT),
        _checked_optional(obj, "preset", str, path),
        architecture,
        _checked_optional(obj, "scale_factor_source", str, path),
        _checked_optional(obj, "prediction_type", str, path),
    )


def read_weights(path: str | Path, part: AnyPart) -> Weights:
    """Read the weights of ``part`` from ``path`` in any supported layout.

    Raises:
        CheckpointError: missing/unreadable file, a file holding code, the weights of another part, or a
            malformed field (named, with the file).
    """
    path = Path(path)
    if not path.is_file():
        if is_symlink_loop(path):
            raise CheckpointError(f"{part} checkpoint {path} {SYMLINK_LOOP}")
        raise CheckpointError(f"{part} checkpoint not found: {path}{_download_hint(path)}")
    obj = _torch_load(path, "")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _read_ours(obj, path, part)
    if isinstance(obj, dict):
        if part == "autoencoder" and _is_wrapped_vae(obj):
            # MAISI's loaders accept a VAE saved under 'unet_state_dict' (NV-Generate-CTMR
            # scripts/inference.py, utils_infer.py): read it as the plain state_dict it wraps.
            state_dict = _checked_state_dict(obj, "unet_state_dict", path, "released MAISI autoencoder")
            return Weights(path, state_dict, "released-vae", None, None, None)
        for key, holder in _RELEASED_KEYS.items():
            if key in obj:
                if holder != _network_part(part):
                    raise CheckpointError(
                        f"{path}: holds a released MAISI {holder} checkpoint ('{key}'), "
                        f"expected a {part} checkpoint"
                    )
                fmt: SourceFormat = "released-unet" if holder == "diffusion_unet" else "released-controlnet"
                layout = f"released MAISI {holder}"
                state_dict = _checked_state_dict(obj, key, path, layout)
                return Weights(path, state_dict, fmt, _checked_scale_factor(obj, path, layout), None, None)
    if _is_state_dict(obj):
        return Weights(path, obj, "released-vae", None, None, None)
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
    raise CheckpointError(
        f"{path}: unrecognised checkpoint layout ({kind}{keys}); expected our format, "
        "a plain state_dict, or MAISI's unet_state_dict / controlnet_state_dict files"
    )


def read_plain_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a third-party weights file (``weights_only``), unwrapped from ``{"state_dict": ...}`` (e.g.
    MedicalNet's release layout), ``module.`` prefixes dropped. ``key`` is the config key the path came from.

    Raises:
        CheckpointError: missing or unreadable file, a file holding code, or one holding no dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key}: file {why_absent(path)}: {path}")
    obj = _torch_load(path, f"{key}: ", "weights file (torch.load, weights_only)")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(f"{key}: {path} holds no state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def summarise_mismatch(
    model_sd: dict[str, torch.Tensor], file_sd: dict[str, torch.Tensor], limit: int = 5
) -> str:
    """A few lines naming missing / unexpected keys and shape conflicts, instead of a 500-line dump."""
    missing = [k for k in model_sd if k not in file_sd]
    unexpected = [k for k in file_sd if k not in model_sd]
    shapes = [
        f"{k}: file {tuple(file_sd[k].shape)} vs network {tuple(v.shape)}"
        for k, v in model_sd.items()
        if k in file_sd and tuple(file_sd[k].shape) != tuple(v.shape)
    ]
    lines = []
    for title, items in (
        ("missing in file", missing),
        ("unexpected in file", unexpected),
        ("shape conflicts", shapes),
    ):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "\n".join(lines)


def _architecture_diff(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(expected))
    return [
        f"{k}: checkpoint {json.dumps(recorded.get(k))} vs preset {json.dumps(expected.get(k))}"
        for k in keys
        if recorded.get(k) != expected.get(k)
    ]


def check_fits(
    weights: Weights, preset: Preset | MaskPreset, part: AnyPart, network: torch.nn.Module
) -> None:
    """Raise CheckpointError when ``weights`` cannot load strictly into ``network`` of ``preset``."""
    if weights.architecture is not None:
        diff = _architecture_diff(weights.architecture, _architecture(preset, part))
        if diff:
            raise CheckpointError(
                f"{weights.path}: {part} checkpoint was made for preset '{weights.preset}', "
                f"which differs from preset '{preset.name}':\n  " + "\n  ".join(diff[:8])
            )
    summary = summarise_mismatch(network.state_dict(), weights.state_dict)
    if summary:
        raise CheckpointError(
            f"{weights.path}: weights do not fit the {part} of preset '{preset.name}' "
            f"(a checkpoint of another architecture?):\n{summary}"
        )


def load_strictly(network: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` into ``network`` strictly; a mismatch raises CheckpointError starting with ``what``
    and naming the missing, unexpected and reshaped keys."""
    mismatch = summarise_mismatch(network.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{what}:\n{mismatch}")
    network.load_state_dict(state_dict, strict=True)


def _download_hint(path: Path) -> str:
    """For a released MAISI file, the command that fetches it."""
    from maisi.resources import load_json  # the manifest of released files

    variants = load_json("released_weights.json")["variants"]
    for name, spec in variants.items():
        if any(Path(f.get("path", "")).name == path.name for f in spec.get("files", [])):
            return f" (a released MAISI file: python -m maisi.download --variant {name} --dest {path.parent})"
    return ""


def _described(name: str) -> str:
    """``'name' (family)``: a preset with the modality family of its networks (as the registry knows it)."""
    preset = PRESETS.get(name)
    return f"'{name}' ({preset.modality_family if preset is not None else 'not a preset of this version'})"


def check_preset(weights: Weights, preset: Preset, part: Part, allow_mismatch: bool) -> str:
    """Compare the preset a checkpoint of ours records with the config's; a mismatch is refused unless
    allowed (then warned). Returns what was found, for the sample metadata.

    Released MAISI checkpoints record no preset: there is nothing to compare, "not checked" is logged and
    returned (their architecture is still checked by :func:`check_fits`).

    Raises:
        CheckpointError: made for another preset (naming the checkpoint, both presets and their modality
            families) and ``allow_mismatch`` is false.
    """
    if weights.preset is None:
        log.info(
            "%s checkpoint %s: preset not checked (a released MAISI file records none)", part, weights.path
        )
        return "not checked: a released MAISI checkpoint records no preset"
    made_for, run_as = _described(weights.preset), _described(preset.name)
    if weights.preset == preset.name:
        return f"matches: made for preset {made_for}"
    what = f"{part} checkpoint was made for preset {made_for}"
    if not allow_mismatch:
        raise CheckpointError(
            f"{weights.path}: {what}; the config's preset is {run_as}. Use a checkpoint of that preset, or "
            'set "allow_preset_mismatch": true in the config to run it anyway'
        )
    log.warning("%s: %s, run as %s ($.allow_preset_mismatch)", weights.path, what, run_as)
    return f"mismatch allowed: made for preset {made_for}, run as {run_as}"


def load_network(
    preset: Preset, part: Part, path: str | Path, runtime: RuntimeOptions | None = None
) -> tuple[torch.nn.Module, Weights]:
    """Build ``part`` of ``preset`` and load ``path`` into it strictly; the network is in eval mode on CPU."""
    weights = read_weights(path, part)
    network = build_network(preset, part, runtime)
    check_fits(weights, preset, part, network)
    network.load_state_dict(weights.state_dict, strict=True)
    return network.eval(), weights


def save_checkpoint(
    path: str | Path,
    network: torch.nn.Module,
    preset: Preset | MaskPreset,
    part: AnyPart,
    *,
    scale_factor: float | None = None,
    config_sha256: str | None = None,
    scale_factor_source: str | None = None,
) -> Path:
    """Write ``network`` in our format, atomically (temporary name, then rename).

    Plain-LDM presets (:mod:`maisi.families.ldm`) also record ``family`` ("ldm") and, for the UNet, the
    ``prediction_type`` it was trained for; ``scale_factor_source`` says where the scale factor came from.
    """
    path = Path(path)
    family = getattr(preset, "family", None)
    extra: dict[str, Any] = {"family": family} if isinstance(family, str) else {}
    if part == "diffusion_unet" and getattr(preset, "prediction_type", None):
        extra["prediction_type"] = preset.prediction_type
    if scale_factor_source is not None:
        extra["scale_factor_source"] = scale_factor_source
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "part": part,
        "preset": preset.name,
        "architecture": _architecture(preset, part),
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "scale_factor": None if scale_factor is None else float(scale_factor),
        **extra,
        "provenance": {
            "maisi_version": maisi.__version__,
            "torch_version": str(torch.__version__),
            "monai_version": str(monai.__version__),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config_sha256": config_sha256,
        },
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path
