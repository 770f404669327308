"""A training run of one stage: the run folder, starting fresh or resuming, building the stage, training.

The run folder holds ``train_config.json`` (the resolved config and its hash), ``state/last.pt``
(resumable), the inference checkpoint(s) that ``maisi.infer`` loads, and ``tensorboard/``. A folder with
``train_config.json`` but no state holds a run stopped before its first checkpoint: rerunning it (with or
without ``--resume``) starts it over. Under torchrun every process trains on its own batches (DDP) and rank 0
alone writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import fields, replace
from pathlib import Path

import torch

from maisi import threads
from maisi.atomic import write_json
from maisi.config import TrainConfig, to_jsonable
from maisi.config.train_config import MASK_STAGES
from maisi.data.datalist import data_root, read_datalist, split_by_fold
from maisi.device import resolve_device
from maisi.distributed import Ranks, finish, init_from_env
from maisi.errors import InputError
from maisi.families.ct import PRESETS, get_preset
from maisi.families.ldm import LDM_PRESETS
from maisi.families.mask import MASK_PRESETS, get_mask_preset
from maisi.files import check_output_dir
from maisi.run_paths import RunPaths
from maisi.training.loop import Stage, train
from maisi.training.resume import RESUMABLE_CHANGES, comparable, config_differences, saved_run_config
from maisi.training.state import (
    TrainState,
    check_restorable,
    load_train_state,
    read_run_record,
    save_train_state,
    state_path,
)

log = logging.getLogger("maisi.train")
LDM_STAGES = ("autoencoder", "diffusion")  # the stages of a plain-LDM preset


def config_hash(config: TrainConfig, stage: str) -> str:
    data = comparable(to_jsonable(config))
    return hashlib.sha256(json.dumps({"stage": stage, **data}, sort_keys=True).encode()).hexdigest()


def resumable_state(config: TrainConfig, stage: str, digest: str) -> TrainState:
    """The run's state, if the config given now may continue it; else InputError naming each changed key."""
    state = load_train_state(config.output_dir, stage)
    if state.config_sha256 == digest:
        return state
    saved = saved_run_config(config.output_dir, state.config, state.config_sha256)
    may_change = ", ".join(f"$.{key}" for key in RESUMABLE_CHANGES)
    refusal = f"--resume: {config.output_dir} was trained with another config; only {may_change} may change"
    if saved is None:
        raise InputError(f"{refusal} (its record of that config is gone)")
    changed = config_differences(saved, to_jsonable(config), stage)
    if changed:
        raise InputError(f"{refusal}. Changed: " + "; ".join(changed))
    log.info(
        "resuming: the config matches the run's key by key "
        "(keys added to the schema since take their defaults)"
    )
    return state


def starting_state(config: TrainConfig, stage: str, digest: str, resume: bool) -> TrainState | None:
    """The state to continue from, or None to start at step 0; refuses a folder that holds another run.

    A folder with ``train_config.json`` but no state holds a run stopped before its first checkpoint:
    there is nothing to continue, so a rerun (or ``--resume``) starts it over at step 0, provided the
    config is the run's own (the keys ``--resume`` may change aside).
    """
    folder = Path(config.output_dir)
    if state_path(folder).exists():
        if resume:
            return resumable_state(config, stage, digest)
        try:
            what = (read_run_record(folder) or {}).get("stage", "a")
        except InputError:
            what = "a"
        raise InputError(
            f"output directory {folder} holds {what} run already; pass --resume to continue it "
            "or choose another output_dir"
        )
    record = read_run_record(folder)
    if record is None:
        if resume:
            raise InputError(f"--resume: {folder} holds no training state ({state_path(folder)} is missing)")
        return None
    stopped = f"output directory {folder} holds a '{record['stage']}' run stopped before its first checkpoint"
    if record["stage"] != stage:
        raise InputError(f"{stopped}, not '{stage}'; choose another output_dir")
    changed = []
    if record["config_sha256"] != digest:
        changed = config_differences(record["config"], to_jsonable(config), stage)
    if changed:
        raise InputError(
            f"{stopped}, with another config; rerun it with that config or choose another "
            "output_dir. Changed: " + "; ".join(changed)
        )
    log.info(
        "%s holds no training state yet (its run stopped before the first checkpoint): starting %s from "
        "step 0",
        folder,
        stage,
    )
    return None


def check_stage_preset(name: str, config: TrainConfig) -> None:
    """``$.preset`` is of the kind the stage trains: a mask preset for the mask stages, a CT preset else.

    Raises:
        InputError: naming ``$.preset``, the stage and the presets of the right kind.
    """
    mask_stage, is_mask = name in MASK_STAGES, config.preset in MASK_PRESETS
    if config.preset in LDM_PRESETS:
        if name not in LDM_STAGES:
            raise InputError(
                f"$.preset: '{config.preset}' is a plain-LDM preset (autoencoder + diffusion UNet); the "
                f"{name} stage trains {'a mask preset' if mask_stage else 'a CT preset'}'s network; "
                f"train an LDM preset with the {' or '.join(LDM_STAGES)} stage"
            )
        return
    if is_mask and not mask_stage:
        raise InputError(
            f"$.preset: '{config.preset}' is a mask preset; the {name} stage trains the networks of a CT "
            f"preset ({', '.join(PRESETS)})"
        )
    if mask_stage and not is_mask:
        what = "a CT preset" if config.preset in PRESETS else "not a mask preset"
        raise InputError(
            f"$.preset: '{config.preset}' is {what}; the {name} stage trains the networks of a mask preset "
            f"({', '.join(MASK_PRESETS)})"
        )


def build_stage(name: str, config: TrainConfig, ranks: Ranks, device: torch.device) -> Stage:
    """Check the stage's inputs and build it (networks, data)."""
    check_stage_preset(name, config)
    if config.preset in LDM_PRESETS:
        return _build_ldm_stage(name, config, ranks, device)
    train_entries, val_entries = split_by_fold(read_datalist(config.datalist), config.fold)
    root = data_root(config.datalist, config.data_root)
    if name in MASK_STAGES:
        return _build_mask_stage(name, config, root, train_entries, val_entries, ranks, device)
    preset = get_preset(config.preset)
    if name == "autoencoder":
        from maisi.training.autoencoder import AutoencoderStage

        return AutoencoderStage(config, preset, root, train_entries, val_entries, device, ranks)
    from maisi.training.latent_data import LatentCases

    need_label = name == "controlnet"
    train = LatentCases(train_entries, root, preset, need_label)
    val = LatentCases(val_entries, root, preset, need_label) if val_entries else None
    if name == "diffusion":
        from maisi.training.diffusion import DiffusionStage

        return DiffusionStage(config, preset, train, val, ranks, device)
    from maisi.training.controlnet import ControlNetStage

    return ControlNetStage(config, preset, train, val, device)


def _build_ldm_stage(name: str, config: TrainConfig, ranks: Ranks, device: torch.device) -> Stage:
    from maisi.training.ldm_data import read_ldm_dataset, split_cases
    from maisi.training.ldm_stages import LDMAutoencoderStage, LDMDiffusionStage

    preset = LDM_PRESETS[config.preset]
    dataset = read_ldm_dataset(config.datalist, config.data_root, config.ldm.channel)
    train, val = split_cases(dataset, config.fold, config.ldm.num_validation)
    if name == "autoencoder":
        return LDMAutoencoderStage(config, preset, dataset, train, val, device, ranks)
    return LDMDiffusionStage(config, preset, dataset, train, val, ranks, device)


def _build_mask_stage(
    name: str,
    config: TrainConfig,
    root: Path,
    train_entries: list,
    val_entries: list,
    ranks: Ranks,
    device: torch.device,
) -> Stage:
    preset = get_mask_preset(config.preset)
    if name == "mask_autoencoder":
        from maisi.training.mask_autoencoder import MaskAutoencoderStage

        return MaskAutoencoderStage(config, preset, root, train_entries, val_entries, device, ranks)
    from maisi.training.mask_diffusion import MaskDiffusionStage, MaskLatentCases

    train = MaskLatentCases(train_entries, root, preset)
    val = MaskLatentCases(val_entries, root, preset) if val_entries else None
    return MaskDiffusionStage(config, preset, train, val, ranks, device)


def declared_paths(config: TrainConfig) -> RunPaths:
    """What a run reads (the datalist and its cases, the init checkpoints, the perceptual weights, the label
    dictionary) and writes: the run folder, whose names it chooses, so no input may lie inside it."""
    paths = RunPaths().read("$.datalist", config.datalist)
    root = data_root(config.datalist, config.data_root)
    try:
        if config.preset in LDM_PRESETS:  # a Decathlon dataset.json or a datalist
            from maisi.training.ldm_data import read_ldm_dataset

            dataset = read_ldm_dataset(config.datalist, config.data_root, None, check_channel=False)
            entries = [entry for _, entry in dataset.entries]
        else:
            entries = read_datalist(config.datalist)["training"]
    except InputError:  # the run refuses it when it reads its data, after the run folder's checks
        entries = []
    for i, entry in enumerate(entries):
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                paths.read(f"$.training[{i}].{key} of $.datalist", root / entry[key])
    for part in fields(config.init):
        paths.read(f"$.init.{part.name}", getattr(config.init, part.name))
    paths.read("$.autoencoder.perceptual_weights", config.autoencoder.perceptual_weights)
    paths.read("$.controlnet.label_dict", config.controlnet.label_dict)
    return paths.write_into("$.output_dir", config.output_dir, owned=True)


def prepare(
    stage_name: str, config: TrainConfig, resume: bool, ranks: Ranks | None = None
) -> tuple[Stage, TrainState | None, str]:
    """Every check of a run, in order: the stage's preset, what it reads and writes (the guard of
    :mod:`maisi.run_paths`), the run folder (fresh or resumable), the data and networks built with their
    init checkpoints, a resumed state that fits them; writes nothing.

    Returns:
        The built stage, the state to resume from (or None) and the config's hash.

    Raises:
        InputError: whatever the run would refuse.
    """
    ranks = ranks or Ranks()
    device = ranks.device(resolve_device(config.device))
    check_stage_preset(stage_name, config)  # before anything is read or written
    declared_paths(config).check("train")
    digest = config_hash(config, stage_name)
    check_output_dir(config.output_dir, "$.output_dir")
    state = starting_state(config, stage_name, digest, resume)
    torch.manual_seed(config.seed)  # fresh networks start from the same weights on every run and rank
    stage = build_stage(stage_name, config, ranks, device)
    if state is not None:
        check_restorable(state, stage.model, stage.state(), state_path(config.output_dir))
    return stage, state, digest


def run(stage_name: str, config: TrainConfig, resume: bool) -> None:
    """Train ``stage_name`` as ``config`` says, fresh or (``resume``) from the run folder's state."""
    device = resolve_device(config.device)
    ranks = init_from_env(device)
    try:
        device = ranks.device(device)
        stage, state, digest = prepare(stage_name, config, resume, ranks)
        if ranks.is_main:
            if state is not None and state.config_sha256 != digest:
                # matched key by key: re-record the state under today's config first, so that the marker
                # written next never points at a hash the state lacks (a later --resume would find no record)
                state = replace(state, config_sha256=digest, config=to_jsonable(config))
                save_train_state(config.output_dir, state)
            write_json(
                Path(config.output_dir) / "train_config.json",
                {
                    "stage": stage_name,
                    "config_sha256": digest,
                    "config": to_jsonable(config),
                    "threads": threads.record(),  # torch threads of each process, and why
                },
            )
        train(stage, config, ranks, device, digest, state)
    finally:
        finish(ranks)
