"""Model families: the presets of each (``ct``: MAISI's CT/MR networks; ``mask``: MAISI's mask generator),
as plain data importable without torch, the MONAI networks built from them (``networks``) and the checks a
config gets against its preset (``checks``)."""
