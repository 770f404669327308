"""Checkpoints: our self-describing format and the three layouts of the released MAISI weights.

Our format (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "maisi-checkpoint", "format_version": 1, "part": "diffusion_unet",
     "preset": "maisi-ct-rflow", "architecture": {...constructor args that shape the weights...},
     "state_dict": {...}, "scale_factor": 1.0 | None, "provenance": {...}}

Released MAISI layouts (read-only): a plain VAE state_dict; ``{"unet_state_dict", "scale_factor", ...}``;
``{"controlnet_state_dict", ...}``. Loading never unpickles code.
"""

from __future__ import annotations

import datetime as _dt
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import monai
import torch

import maisi
from maisi.atomic import atomic_path
from maisi.errors import CheckpointError
from maisi.files import file_sha256  # noqa: F401 - re-exported: callers import it from here
from maisi.networks import Part, Preset, RuntimeOptions, architecture_of, build_network

FORMAT = "maisi-checkpoint"
FORMAT_VERSION = 1
_RELEASED_KEYS: dict[str, Part] = {"unet_state_dict": "diffusion_unet", "controlnet_state_dict": "controlnet"}

SourceFormat = Literal["maisi", "released-vae", "released-unet", "released-controlnet"]


@dataclass(frozen=True)
class Weights:
    """Weights read from a checkpoint file, with what the file says about them."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    source_format: SourceFormat
    scale_factor: float | None
    preset: str | None  # ours only
    architecture: dict[str, Any] | None  # ours only


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def read_weights(path: str | Path, part: Part) -> Weights:
    """Read the weights of ``part`` from ``path`` in any supported layout.

    Raises:
        CheckpointError: missing/unreadable file, a file holding code, or the weights of another part.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{part} checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), None)
        if reason is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or not a checkpoint)") from None
        raise CheckpointError(f"{path}: refused to load: it holds code or objects, not only weights "
                              f"(loading is weights_only for safety). {reason}") from None
    except Exception as e:  # noqa: BLE001 - zip/EOF/format errors all mean "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("part") != part:
            raise CheckpointError(f"{path}: holds a {obj.get('part')} checkpoint, expected a {part} checkpoint")
        return Weights(path, obj["state_dict"], "maisi", _as_float(obj.get("scale_factor")),
                       obj.get("preset"), obj.get("architecture"))  # fmt: skip
    if isinstance(obj, dict):
        for key, holder in _RELEASED_KEYS.items():
            if key in obj:
                if holder != part:
                    raise CheckpointError(f"{path}: holds a released MAISI {holder} checkpoint ('{key}'), "
                                          f"expected a {part} checkpoint")  # fmt: skip
                fmt: SourceFormat = "released-unet" if holder == "diffusion_unet" else "released-controlnet"
                return Weights(path, obj[key], fmt, _as_float(obj.get("scale_factor")), None, None)
    if _is_state_dict(obj):
        return Weights(path, obj, "released-vae", None, None, None)
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
    raise CheckpointError(f"{path}: unrecognised checkpoint layout ({kind}{keys}); expected our format, "
                          "a plain state_dict, or MAISI's unet_state_dict / controlnet_state_dict files")  # fmt: skip


def read_plain_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a third-party weights file (``weights_only``), unwrapped from ``{"state_dict": ...}`` (e.g.
    MedicalNet's release layout), ``module.`` prefixes dropped. ``key`` is the config key the path came from.

    Raises:
        CheckpointError: missing or unreadable file, or a file holding no dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key}: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip/EOF errors all mean "not a weights file"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{key}: {path} is not a readable weights file (torch.load, weights_only): "
                              f"{first}") from None  # fmt: skip
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(f"{key}: {path} holds no state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def summarise_mismatch(model_sd: dict[str, torch.Tensor], file_sd: dict[str, torch.Tensor], limit: int = 5) -> str:
    """A few lines naming missing / unexpected keys and shape conflicts, instead of a 500-line dump."""
    missing = [k for k in model_sd if k not in file_sd]
    unexpected = [k for k in file_sd if k not in model_sd]
    shapes = [f"{k}: file {tuple(file_sd[k].shape)} vs network {tuple(v.shape)}"
              for k, v in model_sd.items() if k in file_sd and tuple(file_sd[k].shape) != tuple(v.shape)]  # fmt: skip
    lines = []
    for title, items in (("missing in file", missing), ("unexpected in file", unexpected), ("shape conflicts", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "\n".join(lines)


def _architecture_diff(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(expected))
    return [f"{k}: checkpoint {json.dumps(recorded.get(k))} vs preset {json.dumps(expected.get(k))}"
            for k in keys if recorded.get(k) != expected.get(k)]  # fmt: skip


def check_fits(weights: Weights, preset: Preset, part: Part, network: torch.nn.Module) -> None:
    """Raise CheckpointError when ``weights`` cannot load strictly into ``network`` of ``preset``."""
    if weights.architecture is not None:
        diff = _architecture_diff(weights.architecture, architecture_of(preset, part))
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
    preset: Preset,
    part: Part,
    *,
    scale_factor: float | None = None,
    config_sha256: str | None = None,
) -> Path:
    """Write ``network`` in our format, atomically (temporary name, then rename)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "part": part,
        "preset": preset.name,
        "architecture": architecture_of(preset, part),
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "scale_factor": None if scale_factor is None else float(scale_factor),
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
