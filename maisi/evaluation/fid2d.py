"""FID of an LDM's images on [0, 1]: 2D on the images, the project's 2.5D on volumes; local weights only.

Two feature networks, both loaded from a state dict the user supplies (``torch.load(weights_only=True)``):

- ``resnet``: the 2D ResNet of :mod:`maisi.evaluation.fid` (torchvision or MONAI layout); an image (or a
  slice) on [0, 1] is resized to ``image_size`` squared, repeated to 3 channels and ImageNet-normalised
  (:func:`maisi.evaluation.fid.preprocess`); features: the pooled output of ``layer4``.
- ``xrv-densenet121``: torchxrayvision's DenseNet121 (e.g. the ``res224-all`` weights), held by MONAI's
  ``DenseNet121(spatial_dims=2, in_channels=1)``. torchxrayvision's wheel ships no weights and loads its
  downloads with ``weights_only=False``; save its ``model.state_dict()`` once and give that file. Its keys
  (``features.denseblock1.denselayer1.norm1.weight``) are renamed explicitly to MONAI's
  (``...denselayer1.layers.norm1.weight``), ``classifier.*`` and ``op_threshs`` are dropped (features are
  taken before them) and everything else must match strictly. Preprocessing as torchxrayvision expects,
  identical for real and synthetic images: [0, 1] -> 224 x 224 (bilinear) -> x 2048 - 1024, one channel;
  features: ReLU, global average pool of ``features`` (1024), torchxrayvision's ``features2``.

The distance is MONAI's ``FIDMetric`` (:func:`maisi.evaluation.fid.frechet_distance`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121

from maisi.checkpoints import load_strictly, read_plain_state_dict
from maisi.errors import InputError
from maisi.evaluation.fid import (
    PLANES,
    FeatureNetwork,
    frechet_distance,
    load_feature_network,
    plane_slices,
    preprocess,
)

XRV_SIZE = 224
XRV_CLASSES = 18
_XRV_DROPPED = ("classifier.", "op_threshs")


class XrvFeatures(torch.nn.Module):
    """torchxrayvision's ``features2`` on MONAI DenseNet121: (N, 1, 224, 224) -> (N, 1024)."""

    def __init__(self, densenet: DenseNet121) -> None:
        super().__init__()
        self.features = densenet.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)


def xrv_to_monai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchxrayvision DenseNet keys to MONAI's (``denselayerN.X`` -> ``denselayerN.layers.X``) and
    drop the classifier and its thresholds."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_XRV_DROPPED):
            continue
        out[re.sub(r"(denselayer\d+)\.(?!layers\.)", r"\1.layers.", key)] = value
    return out


def load_xrv_densenet(path: str | Path, device: torch.device) -> FeatureNetwork:
    """torchxrayvision DenseNet121 features from a plain state dict, loaded strictly (eval mode).

    Raises:
        CheckpointError: unreadable file, code in it, or keys / shapes that do not fit (named).
    """
    path = Path(path)
    state = xrv_to_monai(read_plain_state_dict(path, "$.ldm.fid.weights"))
    densenet = DenseNet121(spatial_dims=2, in_channels=1, out_channels=XRV_CLASSES)
    features = XrvFeatures(densenet)
    load_strictly(
        features,
        {f"features.{k.removeprefix('features.')}": v for k, v in state.items()},
        f"$.ldm.fid.weights: {path}: not the weights of torchxrayvision's DenseNet121 (1 input channel)",
    )
    return FeatureNetwork(features.eval().to(device), "xrv-densenet121", 1024, path)


def load_network(kind: str, path: str | Path, device: torch.device) -> FeatureNetwork:
    """The feature network ``kind`` (``resnet`` or ``xrv-densenet121``) from its weights file."""
    if kind == "xrv-densenet121":
        return load_xrv_densenet(path, device)
    return load_feature_network(path, device, "$.ldm.fid.weights")


def network_input(kind: str, images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, H, W) images on [0, 1] -> the network's input (see the module docstring)."""
    if kind == "xrv-densenet121":
        resized = F.interpolate(images[:, None].float(), size=(XRV_SIZE, XRV_SIZE), mode="bilinear")
        return resized.clamp(0.0, 1.0) * 2048.0 - 1024.0
    return preprocess(images, image_size)


@torch.no_grad()
def features(
    net: FeatureNetwork,
    kind: str,
    images: torch.Tensor,
    image_size: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(N, F) float64 CPU features of (N, H, W) images on [0, 1]."""
    chunks = [
        net.network(network_input(kind, images[i : i + batch_size], image_size).to(device)).double().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def stack_2d(images: list[torch.Tensor]) -> torch.Tensor:
    """(N, H, W) from (1, 1, H, W) images of one shape."""
    return torch.cat([im[:, 0] for im in images])


def fid_2d(
    net: FeatureNetwork,
    kind: str,
    real: list[torch.Tensor],
    synthetic: list[torch.Tensor],
    image_size: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """FID between two sets of (1, 1, H, W) images on [0, 1] (each set of one shape): ``{"fid"}``.

    Raises:
        InputError: fewer than 2 images in a set.
    """
    if min(len(real), len(synthetic)) < 2:
        raise InputError(
            f"FID needs at least 2 images per set, got {len(real)} real, {len(synthetic)} synthetic"
        )
    r = features(net, kind, stack_2d(real), image_size, batch_size, device)
    s = features(net, kind, stack_2d(synthetic), image_size, batch_size, device)
    return {"fid": frechet_distance(s, r, "2d"), "real_images": len(real), "synthetic_images": len(synthetic)}


def fid_25d_unit(
    net: FeatureNetwork,
    real: list[torch.Tensor],
    synthetic: list[torch.Tensor],
    slice_step: int,
    image_size: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """2.5D FID (XY / YZ / ZX slices, ResNet) of (1, 1, X, Y, Z) volumes on [0, 1]: per plane and the mean.

    Raises:
        InputError: a plane with fewer than 2 slices in a set.
    """
    scores: dict[str, float] = {}
    for plane in PLANES:
        sets = []
        for name, volumes in (("real", real), ("synthetic", synthetic)):
            slices = torch.cat([plane_slices(v[0, 0], plane, slice_step) for v in volumes])
            if slices.shape[0] < 2:
                raise InputError(
                    f"FID of plane {plane}: the {name} set gives {slices.shape[0]} slice(s) with "
                    f"$.ldm.fid.slice_step {slice_step}; lower it or add volumes"
                )
            sets.append(features(net, "resnet", slices, image_size, batch_size, device))
        scores[plane] = frechet_distance(sets[1], sets[0], plane)
    scores["mean"] = sum(scores[p] for p in PLANES) / len(PLANES)
    return scores
