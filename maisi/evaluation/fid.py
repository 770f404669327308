"""2.5D Fréchet Inception Distance of CT or MR volumes, with a 2D ResNet feature network from a *local* file.

Nothing is downloaded. The feature network is MONAI's 2D ``ResNet`` (``feed_forward=False``: it returns the
globally average-pooled output of ``layer4``) laid out as torchvision's ImageNet ResNets: 7x7 stride-2
``conv1``, max-pool, ``layer1..4``. Its depth and width are read from the weights file, which may be

* a torchvision ResNet state_dict (``resnet18/34/50/101/152``, ``wide_resnet``-style widths excluded): the
  key names of MONAI's ResNet and torchvision's are identical (``conv1``, ``bn1``, ``layer1.0.conv1`` ...,
  ``layer1.0.downsample.0/1``, ``fc``), so no renaming is needed; torchvision's shortcut convolutions have no
  bias, which is detected;
* a MONAI 2D ResNet state_dict (``monai.networks.nets.resnet50(spatial_dims=2, n_input_channels=3, ...)``),
  whose shortcut convolutions carry a bias.

Either may be wrapped as ``{"state_dict": ...}`` and keys may carry a ``module.`` prefix (DDP); ``fc.*`` is
ignored (features are taken before it). Keras-converted RadImageNet ResNet-50 weights (biases on every
convolution, stride in the first 1x1 convolution) are recognised and refused: MONAI's ResNet cannot hold them.

Preprocessing is identical for real and synthetic volumes: each volume goes to [0, 1] by the intensity
convention of its modality (:func:`maisi.intensity.to_unit`, the VAE's scale): CT HU over [-1000, 1000],
MR by its own 0 to 99.5 percentile range (values above it are clamped to 1 after resizing). CT and MR
features are not comparable, so the callers refuse an FID that mixes them (:func:`modality_mix_problem`).
Then every ``slice_step``-th slice along each axis is taken, each slice resized to ``image_size`` squared
(MONAI ``Resize``, bilinear), repeated to 3 channels and normalised with the ImageNet mean and std. The FID
of each plane is MONAI's ``FIDMetric`` (which needs ``scipy``); MAISI reports the mean of the three planes.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.metrics import FIDMetric
from monai.networks.nets import ResNet
from monai.transforms import Resize

from maisi.checkpoints import load_strictly, read_plain_state_dict
from maisi.errors import CheckpointError, InputError, RunFailure
from maisi.intensity import is_mr, to_unit

log = logging.getLogger("maisi.fid")
Plane = Literal["xy", "yz", "zx"]
PLANES: tuple[Plane, ...] = ("xy", "yz", "zx")
SLICE_AXIS: dict[Plane, int] = {"xy": 2, "yz": 0, "zx": 1}  # the array axis a plane's slices are taken along
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEPTHS = {
    ("basic", (1, 1, 1, 1)): 10,
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
    ("bottleneck", (3, 24, 36, 3)): 200,
}


@dataclass(frozen=True)
class FeatureNetwork:
    """A loaded feature network: ``network`` maps (N, 3, S, S) to (N, ``features``)."""

    network: torch.nn.Module
    name: str
    features: int
    path: Path


def read_state_dict(path: str | Path, key: str = "$.fid.weights") -> dict[str, torch.Tensor]:
    """Tensors of the feature network's weights file (see :func:`maisi.checkpoints.read_plain_state_dict`);
    ``key`` names the config key in errors."""
    return read_plain_state_dict(path, key)


def build_resnet(
    state_dict: dict[str, torch.Tensor], path: Path, key: str = "$.fid.weights"
) -> tuple[ResNet, str]:
    """The MONAI 2D ResNet (torchvision layout) whose depth and width the state_dict implies, and its name.

    Raises:
        CheckpointError: the file holds no 2D ResNet, or a Keras-converted RadImageNet one.
    """
    conv1 = state_dict.get("conv1.weight")
    if conv1 is None or not any(k.startswith("layer4.") for k in state_dict):
        sample = ", ".join(list(state_dict)[:4])
        raise CheckpointError(
            f"{key}: {path}: not the weights of a ResNet (keys {sample}, ...); expected a "
            "torchvision or MONAI 2D ResNet state_dict (conv1, bn1, layer1..layer4)"
        )
    if conv1.ndim != 4:
        raise CheckpointError(
            f"{key}: {path}: conv1.weight has shape {tuple(conv1.shape)}, a "
            f"{conv1.ndim - 2}D network; the 2.5D FID needs a 2D ResNet"
        )
    if "conv1.bias" in state_dict or "layer1.0.conv1.bias" in state_dict:
        raise CheckpointError(
            f"{key}: {path}: a ResNet with biases on its convolutions (the Keras-converted "
            "RadImageNet ResNet-50 layout); not supported: MONAI's ResNet has bias-free "
            "convolutions. Use a torchvision or MONAI ResNet state_dict"
        )
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    layers = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        layers.append(max(found) + 1 if found else 0)
    if min(layers) < 1:
        raise CheckpointError(f"{key}: {path}: ResNet stage layer{layers.index(0) + 1} has no blocks")
    widen = conv1.shape[0] / 64
    bias_downsample = any(re.fullmatch(r"layer\d\.0\.downsample\.0\.bias", k) for k in state_dict)
    network = ResNet(
        block,
        layers,
        [64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,
        widen_factor=widen,
        feed_forward=False,
        bias_downsample=bias_downsample,
    )
    depth = _DEPTHS.get((block, tuple(layers)))
    name = f"resnet{depth}" if depth else f"resnet({block}, {layers})"
    return network, name if widen == 1 else f"{name} x{widen:g} width"


def load_feature_network(
    path: str | Path, device: torch.device, key: str = "$.fid.weights"
) -> FeatureNetwork:
    """Build the 2D ResNet the weights file describes and load it strictly (eval mode, on ``device``).

    Raises:
        CheckpointError: unreadable file, not a supported ResNet, or weights whose shapes conflict with the
            network (e.g. a 1-channel ``conv1``); the message names the conflicting keys.
    """
    path = Path(path)
    state_dict = read_state_dict(path, key)
    network, name = build_resnet(state_dict, path, key)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    what = f"{key}: {path}: weights do not fit the {name} feature network (3 input channels, "
    load_strictly(network, state_dict, what + "torchvision layout)")
    network.eval().to(device)
    return FeatureNetwork(network, name, int(network.in_planes), path)  # in_planes: layer4's output channels


def slice_indices(length: int, step: int) -> range:
    """Slices taken along an axis of ``length`` voxels: every ``step``-th, centred."""
    return range((length - 1) % step // 2, length, step)


def slice_counts(shape: tuple[int, int, int], step: int) -> dict[Plane, int]:
    """How many slices of each plane a volume of ``shape`` gives."""
    return {p: len(slice_indices(shape[SLICE_AXIS[p]], step)) for p in PLANES}


def plane_slices(unit: torch.Tensor, plane: Plane, step: int) -> torch.Tensor:
    """(N, H, W) slices of a (X, Y, Z) volume: ``xy`` along z, ``yz`` along x, ``zx`` along y."""
    axis = SLICE_AXIS[plane]
    index = torch.tensor(list(slice_indices(unit.shape[axis], step)))
    return unit.index_select(axis, index).movedim(axis, 0)


def preprocess(slices: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, H, W) slices in [0, 1] -> (N, 3, S, S) ImageNet-normalised network input."""
    resized = Resize((image_size, image_size), mode="bilinear")(slices)  # N slices as N channels
    resized = torch.as_tensor(resized).float().clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (resized[:, None].expand(-1, 3, -1, -1) - mean) / std


def modality_mix_problem(modalities: dict[Path, str]) -> str | None:
    """Why an FID over these files (each with its modality name) would compare CT with MR, naming the files
    of each kind; None when all are CT or all are MR."""
    kinds: dict[str, list[Path]] = {"CT": [], "MR": []}
    for path, modality in modalities.items():
        kinds["MR" if is_mr(modality) else "CT"].append(path)
    if not all(kinds.values()):
        return None

    def listed(paths: list[Path]) -> str:
        more = f" (+{len(paths) - 5} more)" if len(paths) > 5 else ""
        return ", ".join(str(p) for p in paths[:5]) + more

    return (
        f"FID: the inputs mix CT and MR (CT is scaled from HU, MR by its own percentiles: their features "
        f"are not comparable); CT: {listed(kinds['CT'])}; MR: {listed(kinds['MR'])}. Evaluate each "
        "modality on its own (or set $.fid.weights to null)"
    )


@torch.no_grad()
def volume_features(
    net: FeatureNetwork,
    image: np.ndarray,
    step: int,
    image_size: int,
    batch_size: int,
    device: torch.device,
    *,
    modality: str | int,
    where: str = "image",
) -> dict[Plane, torch.Tensor]:
    """Features of one (X, Y, Z) volume, per plane: {plane: (N, F) float64 on the CPU}.

    Args:
        image: CT in HU, or MR in its own units (``modality`` code >= 8).
        modality: chooses the [0, 1] mapping (:func:`maisi.intensity.to_unit`).
        where: names the volume in errors.

    Raises:
        InputError: a constant MR volume (no percentile range), naming ``where``.
    """
    unit = torch.from_numpy(to_unit(image, modality, where)[0])
    out: dict[Plane, torch.Tensor] = {}
    for plane in PLANES:
        slices = plane_slices(unit, plane, step)
        chunks = [
            net.network(preprocess(slices[i : i + batch_size], image_size).to(device)).double().cpu()
            for i in range(0, slices.shape[0], batch_size)
        ]
        out[plane] = torch.cat(chunks)
    return out


def frechet_distance(synthetic: torch.Tensor, real: torch.Tensor, plane: str = "") -> float:
    """MONAI ``FIDMetric`` of two (N, F) feature sets.

    Raises:
        RunFailure: scipy's matrix square root failed (too few slices for the feature size, typically).
    """
    try:
        with warnings.catch_warnings():  # scipy: "disp" deprecated; "matrix is singular" (see fid_25d's note)
            warnings.filterwarnings("ignore", message=".*disp.*deprecated", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*singular.*")
            return float(FIDMetric()(synthetic, real))
    except ValueError as e:
        raise RunFailure(
            f"FID of plane {plane}: {e} ({real.shape[0]} real and {synthetic.shape[0]} synthetic "
            f"slices of {real.shape[1]} features); use more slices (lower $.fid.slice_step)"
        ) from None


def fid_25d(
    real: dict[Plane, list[torch.Tensor]], synthetic: dict[Plane, list[torch.Tensor]]
) -> dict[str, float]:
    """FID per plane and their mean (MAISI's number): {"xy", "yz", "zx", "mean"}.

    Args:
        real: per plane, the feature tensors (N_i, F) of each real volume.
        synthetic: the same for the synthetic volumes.

    Raises:
        InputError: a plane with fewer than 2 slices in either set (no covariance).
    """
    scores: dict[str, float] = {}
    for plane in PLANES:
        r, s = torch.cat(real[plane]), torch.cat(synthetic[plane])
        if min(r.shape[0], s.shape[0]) < 2:
            raise InputError(
                f"FID of plane {plane}: needs at least 2 slices in each set, got {r.shape[0]} real and "
                f"{s.shape[0]} synthetic; lower $.fid.slice_step"
            )
        if min(r.shape[0], s.shape[0]) <= r.shape[1]:
            log.info(
                "FID of plane %s: %d real and %d synthetic slices for %d features: the covariances are "
                "singular estimates; compare FIDs computed with the same numbers of slices only",
                plane,
                r.shape[0],
                s.shape[0],
                r.shape[1],
            )
        scores[plane] = frechet_distance(s, r, plane)
    scores["mean"] = float(np.mean([scores[p] for p in PLANES]))
    return scores
