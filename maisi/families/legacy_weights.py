"""Strict conversion of old GenerativeModels state dicts to MONAI 1.6 AutoencoderKL and DiffusionModelUNet.

The released BraTS and chest X-ray weights (``weights_format="generative-0.x"``) were saved from the networks
of MONAI GenerativeModels 0.2, whose parameter names differ from MONAI's (old -> new):

- ``<attention block>.to_q|to_k|to_v.*`` -> ``<attention block>.attn.to_q|to_k|to_v.*``;
- ``<attention block>.proj_attn.*`` -> dropped (GenerativeModels >= 0.2 never applied it);
- ``...transformer_blocks.N.attnK.to_out.0.*`` -> ``...transformer_blocks.N.attnK.out_proj.*``;
- ``<upsample>.conv.*`` -> ``<upsample>.postconv.*``;
- ``module.<key>`` (saved under DDP) -> ``<key>``.

An attention block is a self-attention block of the target network (a key ``<block>.attn.to_q.weight``):
the non-local attention of the autoencoder and the self-attention levels of an unconditioned UNet. Its
``proj_attn`` is the only thing dropped: with ``include_fc=False`` MONAI's block has no output projection,
which is what the old code ran. Everything else must match one to one: a key left over on either side or a
tensor of another shape is refused with its name (:class:`~maisi.errors.CheckpointError`, exit 2 at the
CLIs). MONAI's own ``load_old_state_dict`` is lenient (keys it cannot match keep their random values), and
with ``include_fc=True`` it copies the dead ``proj_attn`` into ``out_proj``, changing the outputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from maisi.errors import CheckpointError

__all__ = [
    "convert_legacy_state_dict",
    "dead_legacy_keys",
    "legacy_key_map",
    "load_legacy_state_dict",
    "read_legacy_weights",
]

_SELF_ATTN = re.compile(r"^(?P<block>.+)\.attn\.(?P<proj>to_q|to_k|to_v)\.(?P<p>weight|bias)$")
_CROSS_OUT = re.compile(r"^(?P<block>.+\.transformer_blocks\.\d+\.attn\d+)\.out_proj\.(?P<p>weight|bias)$")
_SELF_OUT = re.compile(r"^(?P<block>.+)\.attn\.out_proj\.(?P<p>weight|bias)$")
_DDP_PREFIX = "module."
_SHOWN = 10  # names listed in a refusal before "and N more"


def legacy_key_map(new_keys: Iterable[str]) -> dict[str, str | None]:
    """The old GenerativeModels name of each key of a MONAI 1.6 network (None: the old network had none).

    Args:
        new_keys: the keys of the target network's ``state_dict()``.

    Returns:
        new key -> old key, in the order of ``new_keys``. None marks the output projection of a
        self-attention block built with ``include_fc=True``: the old code never applied one.
    """
    mapping: dict[str, str | None] = {}
    for key in new_keys:
        if m := _SELF_ATTN.match(key):
            mapping[key] = f"{m['block']}.{m['proj']}.{m['p']}"
        elif m := _CROSS_OUT.match(key):
            mapping[key] = f"{m['block']}.to_out.0.{m['p']}"
        elif _SELF_OUT.match(key):
            mapping[key] = None
        elif ".postconv." in key:
            mapping[key] = key.replace(".postconv.", ".conv.", 1)
        else:
            mapping[key] = key
    return mapping


def dead_legacy_keys(new_keys: Iterable[str]) -> list[str]:
    """The old keys that are dropped: ``proj_attn`` weight and bias of every self-attention block."""
    blocks = [m["block"] for k in new_keys if (m := _SELF_ATTN.match(k)) and m["proj"] == "to_q"]
    blocks = [b for i, b in enumerate(blocks) if b not in blocks[:i]]  # weight and bias name one block
    return [f"{b}.proj_attn.{p}" for b in blocks for p in ("weight", "bias")]


def _listed(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _strip_ddp(state: Mapping[str, object], source: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {key!r} is not a string; expected a state dict")
        name = key[len(_DDP_PREFIX) :] if key.startswith(_DDP_PREFIX) else key
        if name in out:
            raise CheckpointError(f"{source}: both '{key}' and '{name}' are present (a DDP prefix twice?)")
        out[name] = value
    return out


def convert_legacy_state_dict(
    state: Mapping[str, object],
    target: torch.nn.Module | Mapping[str, torch.Tensor],
    *,
    source: str = "state dict",
) -> dict[str, torch.Tensor]:
    """Rename an old GenerativeModels state dict to the keys of ``target``, strictly.

    Args:
        state: the old state dict (keys may carry DDP's ``module.`` prefix).
        target: the MONAI network to load into (any device, ``meta`` included), or its state dict.
        source: what ``state`` is, for messages (e.g. the file path).

    Returns:
        A state dict with exactly ``target``'s keys, in its order, holding ``state``'s tensors.

    Raises:
        CheckpointError: a key of ``target`` has no counterpart, a key of ``state`` is left over (other than
            the dead ``proj_attn`` of an attention block), a value is not a tensor, or a shape differs; the
            message names every such key (the first ten of each kind) and both shapes.
    """
    old = _strip_ddp(state, source)
    new_state = target.state_dict() if isinstance(target, torch.nn.Module) else target
    mapping = legacy_key_map(new_state)
    used = {o for o in mapping.values() if o is not None}
    dead = set(dead_legacy_keys(new_state)) - used

    problems = []
    no_counterpart = [n for n, o in mapping.items() if o is None]
    missing = [
        f"{o} (for {n})" if o != n else o for n, o in mapping.items() if o is not None and o not in old
    ]
    if no_counterpart:
        problems.append(
            f"{len(no_counterpart)} key(s) of the network have no old counterpart: {_listed(no_counterpart)} "
            "(GenerativeModels >= 0.2 never applied proj_attn: build the network with include_fc=False)"
        )
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the file: {_listed(missing)}")
    extra = [k for k in old if k not in used and k not in dead]
    if extra:
        problems.append(f"{len(extra)} key(s) of the file that the network does not have: {_listed(extra)}")
    not_tensors = [k for k in used & old.keys() if not isinstance(old[k], torch.Tensor)]
    if not_tensors:
        problems.append(f"value(s) that are not tensors: {_listed(sorted(not_tensors))}")
    if problems:
        raise CheckpointError(f"{source} does not fit the network: " + "; ".join(problems))

    out: dict[str, torch.Tensor] = {}
    wrong_shapes = []
    for new, o in mapping.items():
        tensor = old[o]  # type: ignore[index]
        want = tuple(new_state[new].shape)
        if tuple(tensor.shape) != want:  # type: ignore[union-attr]
            wrong_shapes.append(f"'{o}' has shape {tuple(tensor.shape)}, the network's '{new}' {want}")  # type: ignore[union-attr]
        out[new] = tensor  # type: ignore[assignment]
    if wrong_shapes:
        raise CheckpointError(
            f"{source} does not fit the network: {len(wrong_shapes)} shape mismatch(es): "
            + "; ".join(wrong_shapes[:_SHOWN])
            + (f"; and {len(wrong_shapes) - _SHOWN} more" if len(wrong_shapes) > _SHOWN else "")
        )
    return out


def load_legacy_state_dict(
    network: torch.nn.Module, state: Mapping[str, object], *, source: str = "state dict"
) -> None:
    """Convert ``state`` (:func:`convert_legacy_state_dict`) and load it into ``network``, ``strict=True``.

    A network built on the ``meta`` device receives the file's tensors themselves (``assign=True``).
    """
    converted = convert_legacy_state_dict(state, network, source=source)
    on_meta = any(p.is_meta for p in network.parameters())
    network.load_state_dict(converted, strict=True, assign=on_meta)


def read_legacy_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a released weights file (a plain state dict) on the CPU, without unpickling code.

    Raises:
        CheckpointError: the file is missing, not a torch file, or not a flat state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip/EOF errors all mean "not readable weights"
        raise CheckpointError(f"{path} is not a readable torch weights file ({err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = list(state)[:_SHOWN] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"{path} is not a plain state dict of tensors (found {top})")
    return dict(state)
