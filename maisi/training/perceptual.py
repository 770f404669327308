"""Perceptual loss from a *local* weights file: MONAI's ``PerceptualLoss`` with its network built here.

Nothing is ever downloaded. The network type is recognised from the file's keys and shapes: a full
``lpips.LPIPS`` state_dict (squeeze/alex/vgg, needs ``lpips``), a torchvision ResNet50 state_dict (needs
``torchvision``) or a MedicalNet ResNet10/50 checkpoint (MONAI only). A file that fits no network raises
CheckpointError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from monai.losses import PerceptualLoss
from monai.networks.nets import ResNetFeatures
from monai.utils import optional_import
from torch import nn

from maisi.checkpoints import load_strictly, read_plain_state_dict
from maisi.errors import CheckpointError, InputError
from maisi.monai_internals import normalize_tensor, spatial_average_3d

PerceptualType = Literal[
    "squeeze", "alex", "vgg", "resnet50", "medicalnet_resnet10_23datasets", "medicalnet_resnet50_23datasets"
]
FAKE_3D_RATIO = 0.2  # MAISI: 2.5D perceptual loss on 20% of the slices along each axis


# ------------------------------------------------------------------------------------ perceptual loss


class _LocalPerceptualLoss(PerceptualLoss):
    """MONAI's ``PerceptualLoss`` (its 2.5D / 3D ``forward``) around a network built here from local weights.

    MONAI's constructor builds the network itself and, for every type but ``resnet50``, fetches pretrained
    parts from the internet even with ``pretrained=False`` (LPIPS loads ImageNet backbones from torchvision,
    MedicalNet/RadImageNet come from torch.hub). We skip it and set the attributes its ``forward`` reads.
    """

    def __init__(self, perceptual_function: nn.Module, is_fake_3d: bool, spatial_dims: int = 3):  # noqa: D107
        nn.Module.__init__(self)
        self.spatial_dims = spatial_dims
        self.perceptual_function = perceptual_function
        self.is_fake_3d = is_fake_3d
        self.fake_3d_ratio = FAKE_3D_RATIO
        self.channel_wise = False


class _MedicalNetSimilarity(nn.Module):
    """MONAI's ``MedicalNetPerceptualSimilarity`` computation on a MONAI ResNet backbone.

    Differs in one point: the z-score of each volume has an epsilon. MONAI divides by the standard deviation
    as is, so a patch of pure air (a constant) would turn the loss into NaN.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.model = backbone
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    @staticmethod
    def _zscore(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean()) / (x.std() + 1e-6)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - MONAI's names
        fi = normalize_tensor(self.model(self._zscore(input))[-1])
        ft = normalize_tensor(self.model(self._zscore(target))[-1])
        return spatial_average_3d(((fi - ft) ** 2).sum(dim=1, keepdim=True), keepdim=True)


def _medicalnet_backbone(depth: Literal[10, 50]) -> nn.Module:
    """MONAI's ``ResNetFeatures`` laid out as MedicalNet's feature extractor (the torch.hub model MONAI uses).

    MedicalNet keeps layer3 and layer4 at stride 1 with dilations 2 and 4; the weights are the same shape
    either way, so we change those convolutions in place.
    """
    net = ResNetFeatures(f"resnet{depth}", pretrained=False, spatial_dims=3, in_channels=1)
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for module in layer.modules():
            if isinstance(module, nn.Conv3d):
                module.stride = (1, 1, 1)
                if module.kernel_size == (3, 3, 3):
                    module.dilation = (dilation,) * 3
                    module.padding = (dilation,) * 3
    return net


def detect_perceptual_type(state_dict: dict[str, torch.Tensor]) -> PerceptualType | None:
    """The perceptual network a state_dict belongs to, from its keys and shapes (None: not recognised)."""
    if "net.slice1.0.weight" in state_dict and "lin0.model.1.weight" in state_dict:  # a full LPIPS module
        if "lin5.model.1.weight" in state_dict:
            return "squeeze"
        return "alex" if state_dict["net.slice1.0.weight"].shape[-1] == 11 else "vgg"
    conv1 = state_dict.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 5:
        bottleneck = "layer1.0.conv3.weight" in state_dict
        return "medicalnet_resnet50_23datasets" if bottleneck else "medicalnet_resnet10_23datasets"
    if conv1 is not None and conv1.ndim == 4 and "fc.weight" in state_dict:
        return "resnet50"
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return read_plain_state_dict(path, "$.autoencoder.perceptual_weights")


def _network_for(kind: PerceptualType, path: Path) -> nn.Module:
    """The randomly initialised network of ``kind`` (never downloading), to be filled from the user's file."""
    if kind.startswith("medicalnet_"):
        return _medicalnet_backbone(50 if "resnet50" in kind else 10)
    if kind == "resnet50":
        torchvision, has_tv = optional_import("torchvision")
        if not has_tv:
            raise InputError(
                f"$.autoencoder.perceptual_weights: {path} holds torchvision ResNet50 weights; "
                "this perceptual network needs the 'torchvision' package (pip install torchvision)"
            )
        return torchvision.models.resnet50(weights=None)
    lpips, has_lpips = optional_import("lpips")
    if not has_lpips:
        raise InputError(
            f"$.autoencoder.perceptual_weights: {path} holds LPIPS-{kind} weights; this perceptual "
            "network needs the 'lpips' package (pip install lpips)"
        )
    # pnet_rand: a randomly initialised torchvision backbone (no ImageNet download); pretrained=False: no
    # linear layers from the lpips package. Both come from the user's file instead.
    return lpips.LPIPS(pretrained=False, net=kind, pnet_rand=True, verbose=False)


def build_perceptual_loss(path: str | Path, spatial_dims: int = 3) -> tuple[PerceptualLoss, PerceptualType]:
    """MONAI ``PerceptualLoss`` whose network weights come from a local file; nothing is downloaded.

    ``spatial_dims`` 2 (2D images, e.g. the slices of a 2D LDM preset): the 2D networks (LPIPS, ResNet50) on
    the images themselves; MedicalNet's 3D networks are refused.

    The network type is recognised from the file:

    * ``squeeze`` / ``alex`` / ``vgg`` (MAISI uses squeeze): a full ``lpips.LPIPS`` state_dict (backbone and
      linear layers), 2.5D on 20% of the slices; needs the ``lpips`` package.
    * ``resnet50``: a torchvision ResNet50 state_dict (e.g. RadImageNet-style finetunes saved in torchvision's
      layout), 2.5D, through MONAI's own ``pretrained_path`` route; needs ``torchvision``.
    * ``medicalnet_resnet10_23datasets`` / ``medicalnet_resnet50_23datasets``: MedicalNet checkpoints (plain
      or ``{"state_dict": ...}``, ``module.`` prefixes allowed), true 3D, built from MONAI's ResNet.

    ``radimagenet_resnet50`` (MONAI's torch.hub model) is not supported: its architecture exists only as code
    downloaded from torch.hub.

    Raises:
        CheckpointError: missing/unreadable file, unknown network, or weights that do not fit the network.
        InputError: the package the network needs is not installed.
    """
    path = Path(path)
    state_dict = _read_state_dict(path)
    kind = detect_perceptual_type(state_dict)
    if kind is None:
        sample = ", ".join(list(state_dict)[:4])
        raise CheckpointError(
            f"$.autoencoder.perceptual_weights: {path}: not the weights of a supported perceptual "
            f"network (keys {sample}, ...); expected a full LPIPS (squeeze/alex/vgg), a torchvision "
            "ResNet50 or a MedicalNet ResNet10/50 state_dict"
        )
    if spatial_dims == 2 and kind.startswith("medicalnet_"):
        raise InputError(
            f"$.autoencoder.perceptual_weights: {path} holds a {kind} network, which is 3D; the images of "
            "this preset are 2D: give LPIPS or ResNet50 weights, or null"
        )
    network = _network_for(kind, path)
    load_strictly(
        network,
        state_dict,
        f"$.autoencoder.perceptual_weights: {path}: weights do not fit the {kind} perceptual network",
    )
    if kind == "resnet50":  # MONAI builds it without downloading when pretrained=False; then our weights
        loss = PerceptualLoss(
            spatial_dims=spatial_dims,
            network_type="resnet50",
            is_fake_3d=spatial_dims == 3,
            fake_3d_ratio=FAKE_3D_RATIO,
            pretrained=False,
        )
        extractor = loss.perceptual_function.model  # torchvision feature extractor up to layer4 (no fc)
        extractor.load_state_dict(
            {k: v for k, v in state_dict.items() if k in extractor.state_dict()}, strict=True
        )
        return loss, kind
    if kind.startswith("medicalnet_"):
        return _LocalPerceptualLoss(_MedicalNetSimilarity(network), is_fake_3d=False), kind
    network.eval()
    for p in network.parameters():
        p.requires_grad = False
    return _LocalPerceptualLoss(network, is_fake_3d=spatial_dims == 3, spatial_dims=spatial_dims), kind


# ---------------------------------------------------------------------------------------------- stage
