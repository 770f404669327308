"""The one module that reaches into MONAI's private structure: every name here is importable from MONAI
but is not its public API (a module-level helper or a building block no package of MONAI exports), so a
MONAI release may move or change it without notice.

Everything else in :mod:`maisi` imports these names from here, never from MONAI;
``tests/test_monai_internals.py`` walks the package to keep it so, and checks that each name still exists
in the installed MONAI. What uses them:

* the building blocks of ``AutoencoderKlMaisi`` (``Maisi*``): :mod:`maisi.vae.monai_adapter` translates
  them into the tiled engine's chain of convolutions (its parity with MONAI's forward is tested there);
* ``normalize_tensor`` and ``spatial_average_3d``: MONAI's own steps of the MedicalNet perceptual
  distance, used by :mod:`maisi.training.perceptual` around a network built from local weights;
* :func:`rand_zoom_factors`: the zoom ``RandZoom`` drew last, recorded by :mod:`maisi.masks.augment`.
"""

from __future__ import annotations

from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    MaisiConvolution,
    MaisiDecoder,
    MaisiDownsample,
    MaisiEncoder,
    MaisiGroupNorm3D,
    MaisiResBlock,
    MaisiUpsample,
)
from monai.losses.perceptual import normalize_tensor, spatial_average_3d
from monai.transforms import RandZoom

__all__ = [
    "MaisiConvolution",
    "MaisiDecoder",
    "MaisiDownsample",
    "MaisiEncoder",
    "MaisiGroupNorm3D",
    "MaisiResBlock",
    "MaisiUpsample",
    "normalize_tensor",
    "rand_zoom_factors",
    "spatial_average_3d",
]


def rand_zoom_factors(zoom: RandZoom) -> list[float]:
    """The per-axis zoom factors ``zoom`` drew at its last call (MONAI keeps them in the private ``_zoom``).

    Args:
        zoom: a ``RandZoom`` that has been called at least once.
    """
    return [float(z) for z in zoom._zoom]
