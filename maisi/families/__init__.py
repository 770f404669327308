"""Model families: the presets of each (``ct``: MAISI's CT/MR networks; ``mask``: MAISI's mask generator;
``ldm``: plain 2D/3D latent diffusion, text-conditioned or not), as plain data importable without torch, the
MONAI networks built from them (``networks``; ``ldm``'s builders), the checks a config gets against its
preset (``checks``), the strict loader of old GenerativeModels weights (``legacy_weights``) and the one
registry of families and the conditions they take (``registry``)."""
