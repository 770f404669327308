"""maisi: controllable 3D CT synthesis with latent diffusion, compatible with NVIDIA MAISI."""

from __future__ import annotations

__version__ = "0.1.0"
