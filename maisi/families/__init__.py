"""Model families: the presets of each (``ct``: MAISI's CT/MR networks; ``mask``: MAISI's mask generator;
``ldm``: plain 2D/3D latent diffusion, text-conditioned or not), as plain data importable without torch, the
one registry of families (``registry``), the MONAI networks built from them (``networks``), the strict
converter of old GenerativeModels weights (``legacy_weights``) and the checks a config gets against its preset
(``checks``)."""
