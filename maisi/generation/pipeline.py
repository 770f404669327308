"""Generation for library users, in memory: one object over the same steps the ``maisi.infer`` run takes.

As diffusers' pipelines and nnU-Net's predictor::

    pipe = Pipeline.from_config("configs/inference.json")  # loads and checks the config, as the CLI
    pipe.check_inputs()      # every check of the run before any work: mask, grid, memory, checkpoints
    plan = pipe.plan()       # the grid, geometry and conditions every sample shares
    sample = pipe(seed=0)    # GeneratedSample: image and mask (Volumes) and the sample's metadata
    sample.image.array       # int16 HU on the plan's grid (MR: arbitrary units), affine in sample.image

Nothing is written. The CLI's run (:mod:`maisi.generation.run`) checks each input with
:func:`check_input` and generates each sample with :func:`generate_sample`, then writes what it returns; so
the same config and seed give the same image here and in the files. A config of many masks
(``$.masks``, ``$.datalist``) is a job for the CLI: the pipeline takes one input.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import maisi
from maisi import seeding, threads
from maisi.config import InferConfig, to_jsonable
from maisi.data.io import Volume
from maisi.device import resolve_device
from maisi.errors import InputError
from maisi.evaluation.quality import mask_fidelity
from maisi.families.checks import load_checked_config
from maisi.generation.files import check_input_files, quality_record
from maisi.generation.memory import check_memory
from maisi.generation.plan import (
    GenerationPlan,
    Models,
    generate_checked,
    load_models,
    plan_for_seed,
    plan_generation,
)
from maisi.intensity import is_mr, output_mapping
from maisi.masks.anatomy import prepare_all


@dataclasses.dataclass(frozen=True)
class GeneratedSample:
    """One generated sample, in memory.

    Attributes:
        image: the CT (int16 HU; MR: arbitrary units) on the plan's grid, with its affine.
        mask: the mask the CT was generated from, on the same grid (None when image-only).
        metadata: what the run records of the sample, less what concerns its files: seed, grid, intensity
            mapping, conditions, sampler, HU-check tries, mask fidelity, how an anatomy mask was made,
            timings, device, versions and the resolved config.
        plan: the sample's plan (in anatomy mode: with its own mask and derived body region).
    """

    image: Volume
    mask: Volume | None
    metadata: dict[str, Any]
    plan: GenerationPlan


def check_input(config: InferConfig, device: torch.device) -> GenerationPlan:
    """The plan of one input, checked: mask read and checked, grid, conditions, then the memory it needs.

    Raises:
        InputError: a bad mask, label dictionary or grid, or a grid the machine's memory cannot hold.
    """
    plan = plan_generation(config, device)
    check_memory(plan, device)
    return plan


def range_key(modality: str) -> str:
    """The metadata key of a sample's voxel range: HU for CT, arbitrary units for MR (no HU)."""
    return "mr_units_min_max" if is_mr(modality) else "hu_min_max"


def generate_sample(
    plan: GenerationPlan, models: Models, seed: int, progress: bool = False
) -> GeneratedSample:
    """Generate the sample of ``seed`` from its plan (:func:`maisi.generation.plan.plan_for_seed` in anatomy
    mode), with the HU check's retries, and describe it.

    Args:
        plan: the sample's plan.
        models: the loaded networks (:func:`maisi.generation.plan.load_models`).
        seed: the sample's seed.
        progress: show the sampling and decoding bars.
    """
    ct, timings, tries = generate_checked(plan, models, seed, progress=progress)
    mask = plan.output_mask
    modality = plan.conditions.modality
    metadata = {
        "seed": seed,
        "noise_streams": seeding.STREAMS,  # how the seed's noise was derived (part of the job key)
        "shape": list(ct.shape),
        "spacing_mm": [round(s, 6) for s in ct.spacing],
        "affine": ct.affine.tolist(),
        # CT's range is in HU (users read "hu_min_max"); MR's is in arbitrary units, so it says so
        range_key(modality): [int(ct.array.min()), int(ct.array.max())],
        "intensity": output_mapping(modality),  # how decoded [0, 1] became these voxels
        "conditions": dataclasses.asdict(plan.conditions),
        "sampler": {"scheduler": plan.config.sampler, "num_inference_steps": plan.config.num_inference_steps},
        "scale_factor": models.scale_factor,
        "quality_check": quality_record(tries),
        "mask_fidelity": mask_fidelity(ct, mask) if mask is not None else None,
        "preset_check": models.preset_check,  # each checkpoint's recorded preset against $.preset
        "mask_grid": plan.mask_grid,
        "anatomy": plan.sample_record,
        "timings_s": {k.removesuffix("_s"): round(v, 3) for k, v in timings.items()},
        "device": str(models.device),
        "threads": threads.record(),  # torch threads, and why ("auto: 2 usable CPUs, load 13.1 -> 1")
        "versions": {
            "maisi": maisi.__version__,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
        },
        "config": to_jsonable(plan.config),
    }
    return GeneratedSample(ct, mask, metadata, plan)


class Pipeline:
    """CT generation from one config, in memory: check, plan, then one call per seed.

    The steps are the CLI's (:func:`check_input`, :func:`maisi.masks.anatomy.prepare_all`,
    :func:`maisi.generation.plan.load_models`, :func:`generate_sample`), so a config refused by
    ``python -m maisi.infer`` is refused here with the same message, and a seed gives the same image.
    The checks run once, at the first of :meth:`check_inputs`, :meth:`plan` or a call.

    Args:
        config: a loaded infer config (:meth:`from_config` loads and checks one from a file).
    """

    def __init__(self, config: InferConfig) -> None:
        self.config = config
        self._plan: GenerationPlan | None = None
        self._models: Models | None = None
        self._digests: dict[int, str] = {}

    @classmethod
    def from_config(cls, path: str | Path, **changes: Any) -> Pipeline:
        """Load an infer config and check it against its preset, as the CLI does.

        Args:
            path: the JSON config.
            changes: top-level config keys replaced after loading (e.g. ``device="cpu"``, ``num_samples=4``).

        Raises:
            ConfigError: every problem of the file, each with its JSON path.
        """
        config = load_checked_config(path, "infer")
        return cls(dataclasses.replace(config, **changes) if changes else config)

    @property
    def device(self) -> torch.device:
        """The compute device (``$.device``; ``auto``: CUDA when available)."""
        return resolve_device(self.config.device)

    @property
    def seeds(self) -> range:
        """The seeds the config asks for: ``$.seed`` to ``$.seed + $.num_samples - 1``."""
        return range(self.config.seed, self.config.seed + self.config.num_samples)

    def check_inputs(self) -> None:
        """Every check the CLI runs before any work, except those of the output folder (nothing is written
        here): the mask (or the anatomy request and each seed's mask), the grid, the memory, and the
        checkpoints loaded strictly into the preset's networks.

        Raises:
            InputError: the first problem found, with the CLI's message (CheckpointError, VolumeError,
                ConfigError derive from it).
        """
        if self._models is not None:
            return
        if self.config.is_ldm:
            raise InputError(
                f"$.preset: '{self.config.preset}' is a plain LDM preset; the Pipeline runs MAISI presets: "
                "run python -m maisi.infer, or maisi.families.ldm_sampling.sample_ldm in memory"
            )
        if self.config.is_batch:
            key = "$.masks" if self.config.masks is not None else "$.datalist"
            raise InputError(
                f"{key}: a Pipeline generates from one input; run python -m maisi.infer for many masks, or "
                "make one Pipeline per mask ($.mask)"
            )
        check_input_files(self.config)  # the CLI's first check of the files, with its messages
        device = self.device
        plan = check_input(self.config, device)
        if plan.anatomy is not None:
            self._digests = prepare_all(plan.anatomy, self.seeds, str(device))
        self._models = load_models(plan, device)
        self._plan = plan

    def plan(self) -> GenerationPlan:
        """The plan every sample shares: grid, affine, conditions, sampler, the mask (or anatomy picks)."""
        self.check_inputs()
        assert self._plan is not None
        return self._plan

    def __call__(self, seed: int | None = None, progress: bool = False) -> GeneratedSample:
        """Generate the sample of ``seed`` (default ``$.seed``), as the CLI would write it.

        Raises:
            InputError: a failed check (:meth:`check_inputs`), or in anatomy mode with a mask database a
                seed outside :attr:`seeds` (the database picks are made for those).
        """
        seed = self.config.seed if seed is None else seed
        plan = self.plan()
        assert self._models is not None
        if plan.anatomy is not None and plan.anatomy.generator is None and seed not in self.seeds:
            raise InputError(
                f"seed {seed}: the mask database picks are made for seeds {self.seeds.start} to "
                f"{self.seeds.stop - 1} ($.seed, $.num_samples)"
            )
        sample_plan = plan_for_seed(plan, seed, self._digests.get(seed), str(self._models.device), progress)
        return generate_sample(sample_plan, self._models, seed, progress)
