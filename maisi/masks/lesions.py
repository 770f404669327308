"""Lesion placement: a new lesion of a chosen label and size, inside a host organ of a mask.

A lesion is an irregular, smooth blob: a ball in millimetres (anisotropic spacing respected) whose radius
varies with direction by a seeded low-frequency random field on the sphere (up to +-``IRREGULARITY`` of the
radius). It is star-shaped around its centre voxel, so it is one piece. Its voxel count is set exactly so
that its volume equals that of a sphere of the requested diameter.

**Diameter** means the *equivalent-sphere diameter*: the diameter of the sphere with the lesion's volume,
``(6 * voxels * voxel_volume / pi) ** (1/3)`` mm. The record also gives ``max_extent_mm``, the longest
distance between two voxel centres of the lesion (its 3D Feret diameter), which is larger for an
irregular blob.

The centre is drawn (seeded) among host voxels far enough from the host's boundary (a Euclidean distance
transform in mm) that every lesion voxel lies more than ``margin_mm`` from the nearest voxel outside the
host; the edge of the volume counts as boundary. Only host voxels change label.

Messages name the classes with their label-dictionary names and ids (``'liver' (1)``). A lesion may be of a
class the mask already holds (a second lung tumour): :func:`tumour_components` reports each connected piece
of a class separately, the placed lesion marked, so two tumours are never reported as one volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from maisi.data.io import Volume
from maisi.errors import InputError
from maisi.labels import BODY_LABEL, MAX_LABEL, load_label_dict
from maisi.seeding import stream_seed

IRREGULARITY = 0.25  # the radius varies by up to +-25 % with direction
MIN_DIAMETER_VOXELS = 2.0  # along the coarsest axis: thinner cannot be shaped in 3D
_NOISE_GRID = 16  # the random field lives on a small grid; the sphere of directions sits inside it
_NOISE_SIGMA = 3.0  # grid cells; with a sphere of radius 5 cells this gives a few bumps around
_SPHERE_RADIUS = 5.0


@dataclass(frozen=True)
class LesionRequest:
    """One lesion to place: its label, equivalent diameter (mm), host label(s) and optional margin (mm)."""

    label: int
    diameter_mm: float
    host_labels: tuple[int, ...]
    margin_mm: float | None = None


def named(ids: Sequence[int], names: dict[int, str]) -> str:
    """``'liver' (1), 'spleen' (3)``: ids with their label-dictionary names (a bare id when it has none)."""
    return ", ".join(f"'{names[int(i)]}' ({int(i)})" if int(i) in names else str(int(i)) for i in ids)


def _describe(label: int, host_labels: Sequence[int], diameter_mm: float, names: dict[int, str]) -> str:
    size = f"{diameter_mm:g}" if _is_number(diameter_mm) else repr(diameter_mm)
    return f"lesion {named([label], names)} in host {named(host_labels, names)} at {size} mm"


def _check_ids(label: object, host_labels: object, names: dict[int, str]) -> tuple[int, tuple[int, ...]]:
    """Label and hosts are ids in 1..255, the label is neither the body nor one of its hosts."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 < label <= MAX_LABEL:
        raise InputError(f"lesion label {label!r}: expected an integer id in 1..{MAX_LABEL}")
    what = f"lesion label {named([label], names)}"
    if isinstance(host_labels, (int, np.integer)):
        host_labels = (host_labels,)
    hosts = tuple(host_labels) if isinstance(host_labels, Sequence) else ()
    if not hosts or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) for h in hosts):
        raise InputError(f"{what}: host {host_labels!r} must be one or more integer label ids")
    if label == BODY_LABEL:
        raise InputError(f"{what} is the body label {BODY_LABEL}; choose a lesion class")
    if label in hosts:
        raise InputError(f"{what} equals its host {named(hosts, names)}; a lesion needs its own label")
    return int(label), tuple(int(h) for h in hosts)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_sizes(what: str, diameter_mm: object, margin_mm: object, spacing: tuple[float, ...]) -> float:
    """Diameter finite, positive and representable; margin finite and >= 0. Returns the margin in mm."""
    if not _is_number(diameter_mm) or not math.isfinite(diameter_mm):
        raise InputError(f"{what}: diameter {diameter_mm!r} mm is not a finite number")
    if diameter_mm <= 0:
        raise InputError(f"{what}: diameter {diameter_mm:g} mm must be > 0")
    minimum = MIN_DIAMETER_VOXELS * max(spacing)
    if diameter_mm < minimum:
        raise InputError(
            f"{what}: diameter {diameter_mm:g} mm is under {MIN_DIAMETER_VOXELS:g} voxels at spacing "
            f"{[round(s, 3) for s in spacing]} mm; the minimum is {minimum:g} mm"
        )
    if margin_mm is None:
        return float(max(spacing))  # one clear voxel of host around the lesion along every axis
    if not _is_number(margin_mm) or not math.isfinite(margin_mm):
        raise InputError(f"{what}: margin {margin_mm!r} mm is not a finite number")
    if margin_mm < 0:
        raise InputError(f"{what}: margin {margin_mm:g} mm must be >= 0")
    return float(margin_mm)


def _direction_field(rng: np.random.Generator, directions: np.ndarray) -> np.ndarray:
    """A smooth random function on the unit sphere, zero mean, max |value| 1, at ``directions`` (N, 3)."""
    noise = ndimage.gaussian_filter(rng.standard_normal((_NOISE_GRID,) * 3), _NOISE_SIGMA, mode="wrap")
    centre = (_NOISE_GRID - 1) / 2
    points = (directions * _SPHERE_RADIUS + centre).T
    values = ndimage.map_coordinates(noise, points, order=1)
    values = values - values.mean()
    peak = np.abs(values).max()
    return values / peak if peak > 0 else values


def lesion_shape(
    diameter_mm: float, spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """The lesion as integer voxel offsets from its centre voxel.

    Args:
        diameter_mm: equivalent-sphere diameter; the blob holds round(sphere volume / voxel volume) voxels.
        spacing: voxel size (mm) along x, y, z.
        rng: the seeded generator (its state advances).

    Returns:
        Offsets (N, 3) int, the centre (0, 0, 0) first, one 6-connected piece; and the largest distance
        (mm) from the centre voxel to a lesion voxel.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    radius = diameter_mm / 2
    target = max(1, round(math.pi / 6 * diameter_mm**3 / float(np.prod(spacing))))
    # a box that holds the blob: its radius is at most (1 + IRREGULARITY) times a radius within ~1 % of
    # ``radius`` (the field has zero mean), so 10 % spare and one voxel suffice
    half = np.ceil(radius * (1 + IRREGULARITY) * 1.1 / spacing).astype(int) + 1
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    mm = offsets * spacing
    distance = np.linalg.norm(mm, axis=1)
    directions = mm / np.where(distance > 0, distance, 1.0)[:, None]
    # distance / (1 + a * g(direction)) is 1-homogeneous along rays: its sub-level sets are star-shaped
    scaled = distance / (1 + IRREGULARITY * _direction_field(rng, directions))
    keep = np.argsort(scaled, kind="stable")[:target]
    blob = np.zeros(tuple(2 * half + 1), dtype=bool)
    blob[tuple((offsets[keep] + half).T)] = True
    pieces, _ = ndimage.label(blob)  # voxelising a star-shaped set can cut off a stray voxel: drop it
    blob = pieces == pieces[tuple(half)]
    out = np.argwhere(blob) - half
    out = out[np.argsort(np.abs(out).sum(axis=1), kind="stable")]
    return out, float(np.linalg.norm(out * spacing, axis=1).max())


def _max_extent_mm(points_mm: np.ndarray) -> float:
    """Longest distance between two of the points (on their convex hull when there is one)."""
    try:
        points_mm = points_mm[ConvexHull(points_mm).vertices]
    except (QhullError, ValueError):  # flat or tiny sets: all points (few of them)
        pass
    diffs = points_mm[:, None, :] - points_mm[None, :, :]
    return float(np.sqrt((diffs**2).sum(axis=-1)).max())


def _host_bounds(host: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty boolean array, per axis."""
    out = []
    for axis in range(3):
        hit = np.flatnonzero(host.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _check_mask(mask: Volume) -> None:
    if mask.array.ndim != 3 or mask.array.dtype.kind not in "iu":
        raise InputError(
            f"lesion placement needs a 3D integer label mask, got {mask.array.dtype} "
            f"of shape {mask.array.shape}"
        )


def _names(label_dict: dict[str, int] | None) -> dict[int, str]:
    """id -> name of ``label_dict`` (None: MAISI's dictionary)."""
    return {i: n for n, i in (label_dict if label_dict is not None else load_label_dict()).items()}


def _place(
    mask: Volume, request: LesionRequest, seed: int, avoid: np.ndarray | None, names: dict[int, str]
) -> tuple[Volume, dict]:
    """Place one lesion; ``avoid`` (bool, mask-shaped) marks voxels that count as outside the host."""
    _check_mask(mask)
    label, hosts = _check_ids(request.label, request.host_labels, names)
    what = _describe(label, hosts, request.diameter_mm, names)
    spacing = mask.spacing
    margin = _check_sizes(what, request.diameter_mm, request.margin_mm, spacing)
    host = np.isin(mask.array, hosts)
    if avoid is not None:
        host &= ~avoid
    if not host.any():
        present = sorted(int(v) for v in np.unique(mask.array) if v != 0)
        raise InputError(
            f"{what}: host {named(hosts, names)} is not in the mask (it holds {named(present, names)})"
        )
    rng = np.random.default_rng(seed)
    offsets, reach = lesion_shape(float(request.diameter_mm), spacing, rng)
    # the distance transform only needs the host's bounding box; one voxel of padding makes the box edge,
    # and so the volume's edge, count as boundary
    box = _host_bounds(host)
    depth = ndimage.distance_transform_edt(np.pad(host[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    # a lesion voxel p of a centre c with depth(c) > reach + margin is more than margin from any
    # non-host voxel, since |p - c| <= reach: so the whole lesion is inside the host
    candidates = np.argwhere(depth > reach + margin)
    if not len(candidates):
        deepest = float(depth.max())
        fits = math.floor(10 * request.diameter_mm * (deepest - margin) / reach) / 10
        hint = f"the largest that fits is about {fits:g} mm" if fits > 0 else "no lesion fits"
        raise InputError(
            f"{what}: host too small (its deepest voxel is {deepest:.1f} mm from its boundary, "
            f"the lesion needs more than {reach + margin:.1f} mm with margin {margin:g} mm); "
            f"{hint}"
        )
    centre = candidates[rng.integers(len(candidates))] + np.array([s.start for s in box])
    voxels = offsets + centre
    array = mask.array.copy()
    index = tuple(voxels.T)
    array[index] = np.where(host[index], label, array[index])  # host only, whatever the geometry says
    count = int(host[index].sum())
    voxel_ml = float(np.prod(spacing)) / 1000
    world = mask.affine @ np.append(centre, 1.0)
    record = {
        "label": label,
        "host_labels": list(hosts),
        "centre_voxel": [int(c) for c in centre],
        "centre_mm": [round(float(c), 3) for c in world[:3]],
        "requested_diameter_mm": float(request.diameter_mm),
        "equivalent_diameter_mm": round((6 * count * voxel_ml * 1000 / math.pi) ** (1 / 3), 3),
        "max_extent_mm": round(_max_extent_mm(voxels[host[index]] * np.asarray(spacing)), 3),
        "voxels": count,
        "volume_ml": round(count * voxel_ml, 4),
        "margin_mm": margin,
        "seed": int(seed),
    }
    return mask.with_array(array), record


def place_lesion(
    mask: Volume,
    *,
    label: int,
    diameter_mm: float,
    host_labels: tuple[int, ...],
    seed: int,
    margin_mm: float | None = None,
    label_dict: dict[str, int] | None = None,
) -> tuple[Volume, dict]:
    """Place one lesion of ``label`` with equivalent diameter ``diameter_mm`` inside the host organ(s).

    Args:
        mask: label mask (x, y, z) of integer ids, RAS affine; not modified.
        label: the lesion's id (1..255, not the body 200, not a host).
        diameter_mm: equivalent-sphere diameter (see the module docstring).
        host_labels: id(s) whose voxels form the host; the lesion replaces only these.
        seed: seeds the shape and the position: the same seed gives the same mask.
        margin_mm: clear host tissue (mm) between the lesion and the host's boundary; None: the coarsest
            voxel size.
        label_dict: name -> id, to name the classes in messages; None: MAISI's dictionary.

    Returns:
        The new mask (same geometry) and a JSON-ready record: label, host_labels, centre_voxel, centre_mm
        (world RAS), requested_diameter_mm, equivalent_diameter_mm (measured), max_extent_mm, voxels,
        volume_ml, margin_mm, seed.

    Raises:
        InputError: bad label or host id, lesion label equal to the host or the body, diameter not finite,
            <= 0 or under 2 voxels of the coarsest axis (the message gives the minimum), host absent from
            the mask, or a host too small for the lesion (the message gives the largest diameter that fits).
    """
    request = LesionRequest(label, diameter_mm, host_labels, margin_mm)
    return _place(mask, request, seed, None, _names(label_dict))


def place_lesions(
    mask: Volume,
    lesions: Sequence[LesionRequest],
    seed: int,
    label_dict: dict[str, int] | None = None,
) -> tuple[Volume, list[dict]]:
    """Place lesions in order, lesion i with the seed of its own stream ``stream_seed(seed, "lesion", i)``
    (:mod:`maisi.seeding`: lesion i of seed s and lesion i + 1 of seed s - 1 share nothing); each keeps clear
    of those placed before.

    Earlier lesions count as outside every later lesion's host, so the margin separates them too.
    ``label_dict`` names the classes in messages (None: MAISI's dictionary).

    Raises:
        InputError: as :func:`place_lesion`, the message starting with ``lesions[i]``.
    """
    _check_mask(mask)
    names = _names(label_dict)
    records: list[dict] = []
    placed = np.zeros(mask.shape, dtype=bool)
    for i, request in enumerate(lesions):
        try:
            before = mask
            mask, record = _place(mask, request, stream_seed(seed, "lesion", i), placed, names)
        except InputError as e:
            raise InputError(f"lesions[{i}]: {e}") from None
        placed |= mask.array != before.array  # exactly this lesion's voxels
        records.append(record)
    return mask, records


def tumour_components(mask: Volume, label: int, placed: np.ndarray | None = None) -> list[dict]:
    """Each connected piece (26-connected) of class ``label`` in ``mask``, largest first.

    Args:
        mask: label mask (x, y, z).
        label: the class whose pieces are reported (e.g. a tumour a lesion was added to).
        placed: bool, mask-shaped: voxels placed as lesions; a piece holding any of them counts as placed.

    Returns:
        Per piece: ``voxels``, ``volume_ml``, ``equivalent_diameter_mm``, ``centre_voxel`` (the voxel of the
        piece nearest its centroid) and ``placed``.
    """
    pieces, count = ndimage.label(mask.array == label, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_ml = float(np.prod(mask.spacing)) / 1000
    out = []
    for index, box in enumerate(ndimage.find_objects(pieces), start=1):
        piece = pieces[box] == index
        points = np.argwhere(piece)
        nearest = points[np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1))]
        voxels = len(points)
        out.append(
            {
                "voxels": voxels,
                "volume_ml": round(voxels * voxel_ml, 4),
                "equivalent_diameter_mm": round((6 * voxels * voxel_ml * 1000 / math.pi) ** (1 / 3), 3),
                "centre_voxel": [int(c + b.start) for c, b in zip(nearest, box)],
                "placed": bool(placed is not None and placed[box][piece].any()),
            }
        )
    return sorted(out, key=lambda p: (-p["voxels"], p["centre_voxel"]))
