"""Tumour-free masks: every tumour voxel becomes its host organ (MAISI v2's ``remove_tumors``, extended).

Classifier-free guidance (:mod:`maisi.sampling`) feeds the ControlNet the tumour-free mask as the
unconditional branch, and the region-contrastive ControlNet loss compares against it. Hosts:

- MAISI's classes (by their MAISI names, at whatever id the dictionary gives them): hepatic tumour ->
  liver, pancreatic tumour -> pancreas, colon cancer primaries -> colon, left/right kidney cyst ->
  left/right kidney, lung tumour -> the lung lobe most common right around it;
- the kidney mass 129 that MAISI's mask generator writes (``dummy6`` in MAISI's dictionary, a class MAISI's
  own ``remove_tumors`` misses) -> the kidney most common around it;
- bone lesion -> the bone most common around it (MAISI v2 leaves a bone lesion in place unless it is given
  pseudo-labels; a tumour-free mask with a lesion left in it would not be tumour-free);
- classes the user added with a host (``python -m maisi.labels add --host``, stored under the label
  dictionary's ``_hosts`` key) -> that host, or the most common of its hosts around it. A declared host
  replaces a built-in rule for the same class;
- lesions placed in anatomy mode (``$.anatomy.lesions[i].host``): the organs a lesion class was placed in
  are a host rule of that class too (added to its rule if it has one): the lesion lies fully inside one of
  them, so the neighbourhood vote picks it.

MAISI's brain-tumour ids (176, 401-403) lie outside the 1..255 range a mask here can hold; a brain tumour
class added by the user names ``brain`` as its host.

Where this differs from MAISI, and why: the neighbourhood vote is taken per connected tumour component
(MAISI takes one vote over all voxels of the class, so a tumour in each lung would both become one lobe).
Like MAISI, the vote counts host voxels in the one-voxel ring (3 x 3 x 3 dilation) around the tumour, falls
back to the host most common in the whole mask, and then to the first host; ties go to the lower id.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch
from scipy import ndimage

from maisi.errors import InputError
from maisi.labels import is_dummy, load_label_dict
from maisi.masks.tumours import BONES, LUNG_LOBES

MaskT = TypeVar("MaskT", np.ndarray, torch.Tensor)

KIDNEY_MASS = 129  # written by MAISI's mask generator ("kidney mass"); "dummy6" in MAISI's dictionary
_KIDNEY_MASS_NAMES = ("dummy6", "kidney mass", "kidney tumor", "kidney tumour")
# MAISI id of a tumour -> MAISI ids of its hosts (several: the neighbourhood vote decides)
_BUILTIN: dict[int, tuple[int, ...]] = {
    26: (1,),  # hepatic tumor -> liver
    24: (4,),  # pancreatic tumor -> pancreas
    27: (62,),  # colon cancer primaries -> colon
    116: (14,),  # left kidney cyst -> left kidney
    117: (5,),  # right kidney cyst -> right kidney
    23: LUNG_LOBES,  # lung tumor -> its lobe
    128: BONES,  # bone lesion -> its bone
    KIDNEY_MASS: (5, 14),  # kidney mass -> its kidney
}
# Names that mark a class as tumour-like: such a class needs a host rule before guidance or the
# contrastive loss can remove it.
_TUMOUR_LIKE = re.compile(
    r"tumou?r|cancer|lesion|cyst|\bmass\b|nodule|metasta|carcinoma|neoplas|lymphoma|sarcoma|malignan|glioma",
    re.IGNORECASE,
)
_CUBE = np.ones((3, 3, 3), dtype=bool)


class _Lesion(Protocol):
    label: str
    host: tuple[str, ...]


def lesion_hosts(
    lesions: Iterable[_Lesion], known: Container[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Class name -> the organs its lesions are placed in (``$.anatomy.lesions``; several lesions of a class:
    all their hosts, in order). With ``known``, a lesion naming a class or host not in it is left out (the
    anatomy checks name it)."""
    out: dict[str, tuple[str, ...]] = {}
    for lesion in lesions:
        if known is not None and not all(n in known for n in (lesion.label, *lesion.host)):
            continue
        out[lesion.label] = tuple(dict.fromkeys((*out.get(lesion.label, ()), *lesion.host)))
    return out


def is_tumour_like(name: str) -> bool:
    """Whether a class name reads as a tumour, cyst or lesion (and so needs a host rule)."""
    return not is_dummy(name) and bool(_TUMOUR_LIKE.search(name))


def tumour_hosts(
    label_dict: dict[str, int], extra_hosts: Mapping[str, Sequence[str]] | None = None
) -> dict[int, tuple[int, ...]]:
    """Tumour id -> host ids, in ``label_dict``'s ids.

    Args:
        label_dict: a validated dictionary (:func:`maisi.labels.load_label_dict`); the hosts it declares
            (its ``hosts``) win over the built-in rules.
        extra_hosts: class name -> host names added to that class's rule (or making one): the organs the
            config's lesions are placed in (:func:`lesion_hosts`).

    Raises:
        InputError: a tumour-like class (:func:`is_tumour_like`) has no host rule, naming it and how to
            declare one; an ``extra_hosts`` name that is not in ``label_dict``.
    """
    maisi_names = {i: n for n, i in load_label_dict().items()}
    out: dict[int, tuple[int, ...]] = {}
    for tumour, hosts in _BUILTIN.items():
        names = _KIDNEY_MASS_NAMES if tumour == KIDNEY_MASS else (maisi_names[tumour],)
        # "dummy6" means the kidney mass only where MAISI put it (a free slot elsewhere)
        found = [
            label_dict[n] for n in names if n in label_dict and (n != "dummy6" or label_dict[n] == tumour)
        ]
        host_ids = tuple(label_dict[maisi_names[h]] for h in hosts if maisi_names[h] in label_dict)
        for tumour_id in found if host_ids else ():
            out[tumour_id] = host_ids
    for name, host_names in getattr(label_dict, "hosts", {}).items():
        out[label_dict[name]] = tuple(label_dict[h] for h in host_names)
    for name, host_names in (extra_hosts or {}).items():
        unknown = [n for n in (name, *host_names) if n not in label_dict]
        if unknown:
            raise InputError(
                f"label dictionary: lesion class or host {', '.join(map(repr, unknown))} not in it"
            )
        tumour = label_dict[name]
        out[tumour] = tuple(dict.fromkeys((*out.get(tumour, ()), *(label_dict[h] for h in host_names))))
    missing = [f"'{n}' (id {i})" for n, i in label_dict.items() if is_tumour_like(n) and i not in out]
    if missing:
        raise InputError(
            f"label dictionary: tumour-like class {', '.join(missing)} has no host rule (the organ it lies "
            "in, which replaces it in the tumour-free mask); declare one with `python -m maisi.labels add "
            '--name NAME --host ORGAN`, under the dictionary\'s "_hosts" key, or (anatomy mode) place it as '
            "a lesion with $.anatomy.lesions[i].host"
        )
    return dict(sorted(out.items()))


def require_hosts(label_dict: dict[str, int], ids: Iterable[int], key: str) -> dict[int, tuple[int, ...]]:
    """Host rules of ``ids`` (e.g. a config's ``weighted_loss_label``); each must have one.

    Raises:
        InputError: naming ``key`` and every id without a host rule (or any tumour-like class without one).
    """
    hosts = tumour_hosts(label_dict)
    names = {i: n for n, i in label_dict.items()}
    missing = [f"{i} ('{names[i]}')" if i in names else str(i) for i in ids if i not in hosts]
    if missing:
        raise InputError(
            f"{key}: class {', '.join(missing)} has no host rule, so no tumour-free mask exists for it; "
            f"classes with one: {', '.join(f'{i} ({names[i]})' for i in hosts)}"
        )
    return {i: hosts[i] for i in ids}


def remove_tumors(
    mask: MaskT, label_dict: dict[str, int], extra_hosts: Mapping[str, Sequence[str]] | None = None
) -> MaskT:
    """The mask with every tumour voxel given its host's id (see the module docstring).

    Args:
        mask: a numpy (X, Y, Z) integer array, or a torch (N, 1, X, Y, Z) integer tensor on any device.
        label_dict: the dictionary the mask's ids come from (its declared hosts included).
        extra_hosts: class name -> host names added to the rules (the lesions' hosts, :func:`lesion_hosts`).

    Returns:
        A new mask of the same type, shape, dtype (and device); the input is untouched.

    Raises:
        InputError: a tumour-like class of ``label_dict`` has no host rule.
        ValueError: ``mask`` is not an integer array of one of the shapes above.
    """
    hosts = tumour_hosts(label_dict, extra_hosts)
    if isinstance(mask, torch.Tensor):
        if mask.ndim != 5 or mask.shape[1] != 1 or mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(
                f"remove_tumors: expected an integer (N, 1, X, Y, Z) tensor, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        out = mask.clone()
        for n in range(mask.shape[0]):
            out[n, 0] = torch.from_numpy(_remove(mask[n, 0].cpu().numpy(), hosts)).to(mask.device)
        return out
    if not isinstance(mask, np.ndarray) or mask.ndim != 3 or not np.issubdtype(mask.dtype, np.integer):
        what = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"remove_tumors: expected an integer (X, Y, Z) array, got {what}")
    return _remove(mask, hosts)


def _remove(mask: np.ndarray, hosts: dict[int, tuple[int, ...]]) -> np.ndarray:
    """One (X, Y, Z) mask: tumours replaced by their host (the votes read the input, never the output)."""
    out = mask.copy()
    for tumour, host_ids in hosts.items():
        voxels = mask == tumour
        if not voxels.any():
            continue
        if len(host_ids) == 1:
            out[voxels] = host_ids[0]
            continue
        components, count = ndimage.label(voxels, structure=_CUBE)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            part = components[grown] == index
            ring = ndimage.binary_dilation(part, structure=_CUBE) & ~part
            host = _vote(mask[grown][ring], host_ids) or _vote(mask, host_ids) or host_ids[0]
            out[grown][part] = host
    return out


def _vote(values: np.ndarray, host_ids: tuple[int, ...]) -> int | None:
    """The host id most common among ``values`` (ties: the lower id); ``None`` when none is there."""
    counts = {h: int(np.count_nonzero(values == h)) for h in sorted(host_ids)}
    best = max(counts, key=lambda h: (counts[h], -h))
    return best if counts[best] else None
