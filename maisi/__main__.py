"""``python -m maisi`` lists the commands."""

from __future__ import annotations

print(
    "maisi commands (each has --help):\n"
    "  python -m maisi.infer --config FILE                 generate CT volumes\n"
    "  python -m maisi.labels add|remap|envelope|show      label dictionaries and masks\n"
    "  python -m maisi.datalist build|validate             KiTS-style datalists\n"
    "  python -m maisi.encode --config FILE                pre-encode CT into latents\n"
    "  python -m maisi.train STAGE --config FILE           train autoencoder|diffusion|controlnet\n"
    "  python -m maisi.evaluate --config FILE              reconstruction, diversity, 2.5D FID, montage\n"
    "  python -m maisi.download --variant V --dest DIR     fetch the released MAISI CT weights"
)
