"""The named choices users make in configs and on command lines, as ``Literal`` types.

Pure data (no torch, no MONAI) so the config layer and every ``--help`` can import it. The JSON schemas
repeat these values as ``enum``s for the editor and the validator; ``tests/config`` checks that the two agree.
"""

from __future__ import annotations

from typing import Literal, get_args

DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "float32", "float16", "bfloat16"]
ThreadsSetting = Literal["auto"] | int  # torch threads: "auto" (maisi.threads) or a positive number
CompileOption = Literal[True, False, "auto"]  # torch.compile of the UNet and ControlNet
Sampler = Literal["ddpm", "ddim", "rflow"]
MaskSampler = Literal["ddpm", "ddim"]  # the mask generator is DDPM-trained
# DDIM's inference timesteps: "linspace" = MONAI >= 1.6 (round(linspace(T - 1, 0, n)): 999, 979, ..., 0);
# "leading" = the seeds' GenerativeModels/diffusers spacing (arange(n) * (T // n), reversed: 980, 960, ..., 0)
TimestepSpacing = Literal["linspace", "leading"]
NullPrompt = Literal["training", "empty_string"]  # text presets: the unconditional half of guidance
DecodeMethod = Literal["full", "sliding_window", "tiled"]
BodyRegion = Literal["head_neck", "chest", "abdomen", "pelvis_lower"]
Modality = Literal[  # the names of MAISI's modality mapping (maisi_modality_mapping.json), in its order
    "unknown",
    "ct",
    "ct_wo_contrast",
    "ct_contrast",
    "mri",
    "mri_t1",
    "mri_t2",
    "mri_flair",
    "mri_pd",
    "mri_dwi",
    "mri_adc",
    "mri_ssfp",
    "mri_mra",
    "mri_t1c",
    "mri_swi",
    "mri_t1_skull_stripped",
    "mri_t2_skull_stripped",
    "mri_flair_skull_stripped",
    "mri_swi_skull_stripped",
    "mri_mra_skull_stripped",
]
VolumeFormat = Literal["nii.gz", "nii", "nrrd", "mha"]
ImageFormat = Literal["nii.gz", "nii", "nrrd", "mha", "png"]  # infer outputs: png for 2D LDM samples only
EncodeKind = Literal["image", "mask"]  # what maisi.encode encodes: CT images, or label masks (mask VAE)
CheckedOrgan = Literal[
    "liver", "spleen", "pancreas", "kidney", "lung", "bone", "brain"
]  # the HU check's organs

SizeSlot = Literal[
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "colon",
    "lung tumor",
    "pancreatic tumor",
    "hepatic tumor",
    "colon cancer primaries",
    "bone lesion",
]  # the 10 slots of MAISI's mask-generation size vector, in its order, spelled as in its label dictionary

DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)
DECODE_METHODS: tuple[str, ...] = get_args(DecodeMethod)
BODY_REGIONS: tuple[BodyRegion, ...] = get_args(BodyRegion)
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 50, "rflow": 30}  # inference steps per sampler

# Body-region names as MAISI spells them (its configs and find_masks) and as we do; value: index in
# BODY_REGIONS.
REGION_INDEX: dict[str, int] = {
    "head": 0,
    "head_neck": 0,
    "head/neck": 0,
    "chest": 1,
    "thorax": 1,
    "chest/thorax": 1,
    "abdomen": 2,
    "pelvis": 3,
    "lower": 3,
    "pelvis/lower": 3,
    "pelvis_lower": 3,
}
