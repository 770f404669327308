"""MAISI v2's region-contrastive ControlNet loss.

The ControlNet runs a second time on the tumour-free mask (every tumour replaced by its host organ). The
region of interest (ROI) is where the two masks differ. Inside it, the two outputs should differ: the
foreground term is minus their mean L1 distance, bounded below by ``-delta`` (``relu(x + delta) - delta``:
pushing further apart gains nothing). Outside the ROI grown by one image voxel, the tumour-free output should
still hit the target: the background term is their mean L1 distance. Both masks are taken to the latent grid
as MAISI does: nearest sampling, i.e. the image voxel at ``factor * i`` of each latent voxel ``i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5  # MAISI's guard against an empty region


def contrast_regions(
    labels: torch.Tensor, labels_tumour_free: torch.Tensor, factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ROI and the background of the loss on the latent grid.

    Args:
        labels: (N, 1, X, Y, Z) integer label mask.
        labels_tumour_free: the same mask with its tumours replaced by their hosts.
        factor: image voxels per latent voxel and axis (the VAE factor); X, Y, Z are multiples of it.

    Returns:
        (roi, background), each (N, 1, X/f, Y/f, Z/f) float32 of 0/1: ``roi`` where the two masks differ,
        ``background`` outside that region dilated by a 3 x 3 x 3 cube (MONAI ``dilate``, filter size 3),
        both sampled at image voxels ``f * i``.
    """
    changed = (labels != labels_tumour_free).float()
    roi = changed[:, :, ::factor, ::factor, ::factor]
    # dilate-then-sample in one step: the max over the 3-voxel cube centred on each sampled voxel (the
    # full-resolution dilated mask is never built; padding counts as outside the ROI, as MONAI's dilate)
    dilated = F.max_pool3d(changed, kernel_size=3, stride=factor, padding=1)
    return roi, 1.0 - dilated


def region_contrastive_terms(
    output: torch.Tensor,
    output_tumour_free: torch.Tensor,
    target: torch.Tensor,
    roi: torch.Tensor,
    background: torch.Tensor,
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAISI v2's two terms (``compute_region_contrasive_loss`` of its scripts/train_controlnet.py).

    Args:
        output: (N, C, x, y, z) network output with the real mask.
        output_tumour_free: (N, C, x, y, z) output with the tumour-free mask (same noise and timesteps).
        target: (N, C, x, y, z) the denoising target.
        roi, background: (N, 1, x, y, z) 0/1 masks from :func:`contrast_regions`.
        delta: the foreground term is kept at or above ``-delta``.

    Returns:
        (foreground, background) scalar terms; each is a mean over its region's voxels and channels, 0 for
        an empty region.
    """
    channels = output.shape[1]
    inside = ((output - output_tumour_free).abs() * roi).sum() / (roi.sum() * channels + EPS)
    foreground = F.relu(delta - inside) - delta  # relu(-inside + delta) - delta
    outside = ((output_tumour_free - target).abs() * background).sum() / (background.sum() * channels + EPS)
    return foreground, outside
