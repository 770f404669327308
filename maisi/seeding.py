"""Independent random streams of a run, one per sample seed and purpose.

Every draw a generation run makes (the starting latent, the sampler's per-step noise, the mask generator's
starting latent and per-step noise, the mask augmentation, each placed lesion) comes from its own stream,
derived from the sample's seed with :class:`numpy.random.SeedSequence`: the stream of ``(seed, purpose,
index)`` is ``SeedSequence(seed, spawn_key=(PURPOSES[purpose], index))``, i.e. child ``index`` of child
``PURPOSES[purpose]`` of ``SeedSequence(seed).spawn``. Streams of different seeds, purposes or indices are
statistically independent (SeedSequence hashes its whole key), while the same triple always gives the same
stream. Seeding generators with ``seed`` and ``seed + 1`` instead makes sample ``s``'s step noise sample
``s + 1``'s starting noise.

:data:`STREAMS` names this derivation; a generated sample's job key includes it, so samples written under
another derivation are generated again rather than mixed with these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

Purpose = Literal["initial_noise", "step_noise", "mask_initial_noise", "mask_step_noise", "augment", "lesion"]

# Fixed positions: a stream's key must never change, so purposes are only ever appended.
PURPOSES: dict[str, int] = {
    "initial_noise": 0,
    "step_noise": 1,
    "mask_initial_noise": 2,
    "mask_step_noise": 3,
    "augment": 4,
    "lesion": 5,
}

STREAMS = "SeedSequence(seed, spawn_key=(purpose, index)) v1"


def _sequence(seed: int, purpose: Purpose, index: int) -> np.random.SeedSequence:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose: expected one of {sorted(PURPOSES)}, got {purpose!r}")
    return np.random.SeedSequence(int(seed), spawn_key=(PURPOSES[purpose], int(index)))


def stream_seed(seed: int, purpose: Purpose, index: int = 0, bits: Literal[32, 63] = 63) -> int:
    """The integer seed of the stream ``(seed, purpose, index)``, for an API that takes an integer.

    Args:
        seed: the sample's seed (>= 0).
        purpose: what the stream draws (:data:`PURPOSES`).
        index: which of several streams of one purpose (lesion i of a sample).
        bits: 63 for a torch generator, 32 for MONAI's ``set_random_state`` (``0 <= seed < 2**32``).

    Returns:
        An integer in ``[0, 2**bits)``.
    """
    high, low = (int(w) for w in _sequence(seed, purpose, index).generate_state(2, dtype=np.uint32))
    return low if bits == 32 else ((high << 32) | low) & (2**63 - 1)


def torch_generator(
    seed: int, purpose: Purpose, device: str | torch.device = "cpu", index: int = 0
) -> torch.Generator:
    """A torch generator on ``device`` seeded with the stream ``(seed, purpose, index)``."""
    import torch  # imported on use: the mask modules that only need integer seeds stay free of torch

    return torch.Generator(device=device).manual_seed(stream_seed(seed, purpose, index))
