"""What ``maisi.evaluate`` reads and writes: the input files, each one's modality, and whether the report
and montage can be written where the config says (checked before any work)."""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path

from maisi.config.evaluate_config import EvaluateConfig
from maisi.data.datalist import case_modality, data_root, read_datalist
from maisi.errors import InputError
from maisi.intensity import is_mr, modality_code_of
from maisi.run_paths import RunPaths

log = logging.getLogger("maisi.evaluation")


def gather_inputs(config: EvaluateConfig) -> tuple[list[Path], list[Path]]:
    """(real, synthetic) files: the datalist's ``training`` images and the synthetic glob / list.

    Raises:
        InputError: unreadable datalist, a glob matching nothing, or missing files (all listed).
    """
    real: list[Path] = []
    if config.real_datalist is not None:
        data = read_datalist(config.real_datalist)
        root = data_root(config.real_datalist, config.data_root)
        real = [root / e["image"] for e in data["training"]]
    synthetic: list[Path] = []
    if isinstance(config.synthetic, str):
        synthetic = sorted(Path(p) for p in glob.glob(config.synthetic, recursive=True))
        if not synthetic:
            raise InputError(f"$.synthetic: no file matches '{config.synthetic}'")
    elif config.synthetic is not None:
        synthetic = [Path(p) for p in config.synthetic]
    missing = [str(p) for p in real + synthetic if not p.exists()]
    if missing:
        raise InputError(f"{len(missing)} input file(s) not found: {', '.join(missing[:10])}")
    return real, synthetic


def sidecar_modality(image: Path) -> tuple[str, Path] | None:
    """The modality a ``maisi.infer`` sample's metadata declares for ``image``, and that file; None when the
    image has no such metadata (not named ``<stem>_image.<fmt>``, no ``<stem>.json``, or a JSON that does
    not describe this image).

    Raises:
        InputError: the metadata is unreadable, or its modality is unknown or contradicts its intensity
            mapping, naming the file.
    """
    stem, found, _ = image.name.rpartition("_image.")
    meta_path = image.with_name(f"{stem}.json")
    if not found or not stem or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{meta_path}: unreadable metadata of {image} ({e})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or files.get("image") != image.name:
        return None  # another tool's JSON, or another sample's: says nothing about this image
    conditions = meta.get("conditions")
    modality = conditions.get("modality") if isinstance(conditions, dict) else None
    if modality is None:
        return None  # metadata of a version that did not record it: $.modality decides
    if not isinstance(modality, str):
        raise InputError(f"{meta_path}: conditions.modality is {modality!r}, expected a modality name")
    try:
        modality_code_of(modality)
    except InputError as e:
        raise InputError(f"{meta_path}: conditions.modality: {e}") from None
    intensity = meta.get("intensity")
    kind = intensity.get("kind") if isinstance(intensity, dict) else None
    if kind in ("ct", "mr") and (kind == "mr") != is_mr(modality):
        raise InputError(
            f"{meta_path}: conditions.modality '{modality}' contradicts intensity.kind '{kind}'; the "
            f"metadata of {image} is inconsistent"
        )
    return modality, meta_path


def input_modalities(config: EvaluateConfig, real: list[Path], synthetic: list[Path]) -> dict[Path, str]:
    """Each input's modality: a real entry's own ``modality``, a synthetic file's from its ``maisi.infer``
    metadata (:func:`sidecar_modality`), else ``$.modality``.

    Raises:
        InputError: unusable metadata beside a synthetic file (see :func:`sidecar_modality`).
    """
    found = dict.fromkeys(real + synthetic, config.modality)
    if config.real_datalist is not None:
        root = data_root(config.real_datalist, config.data_root)
        for entry in read_datalist(config.real_datalist)["training"]:
            found[root / entry["image"]] = case_modality(entry, config.modality)
    for path in synthetic:
        declared = sidecar_modality(path)
        if declared is not None:
            found[path] = declared[0]
            if is_mr(declared[0]) != is_mr(config.modality):
                log.info("%s: modality '%s' from %s (not $.modality '%s')", path, *declared, config.modality)
    return found


def _output_problem(path: Path, key: str) -> str | None:
    """Why ``path`` cannot be written as a file (an existing folder, under a file, no permission), or None."""
    if path.is_dir():
        return f"{key}: {path} is an existing directory; give a file name"
    folder = path.parent
    while not folder.exists():  # the nearest existing ancestor decides (folders are created on writing)
        folder = folder.parent
    if not folder.is_dir():
        return f"{key}: {path} lies under {folder}, which is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{key}: cannot write under {folder} (permission denied)"
    return None


def run_paths(config: EvaluateConfig, real: list[Path], synthetic: list[Path]) -> RunPaths:
    """What an evaluation reads (its volumes, the datalist, the VAE, the FID weights) and writes (the report
    and the montage), for the guard of :mod:`maisi.run_paths`."""
    paths = RunPaths().read("$.real_datalist", config.real_datalist)
    for path in real:
        paths.read("a real volume of $.real_datalist", path)
    for path in synthetic:
        paths.read("a volume of $.synthetic", path)
    paths.read("$.reconstruction.autoencoder", config.reconstruction.autoencoder)
    paths.read("$.fid.weights", config.fid.weights)
    return paths.write("$.output.report", config.output.report).write(
        "$.output.montage", config.output.montage
    )


def declared_paths(config: EvaluateConfig) -> RunPaths:
    """What an evaluation reads and writes (:func:`run_paths`), from the config alone.

    Raises:
        InputError: the inputs cannot be found (see :func:`gather_inputs`).
    """
    return run_paths(config, *gather_inputs(config))


def check_outputs(config: EvaluateConfig, real: list[Path], synthetic: list[Path]) -> None:
    """Refuse, before any work, report and montage paths that cannot be written or would overwrite an input.

    Raises:
        InputError: listing every problem, each naming the config key and the path.
    """
    run_paths(config, real, synthetic).check("evaluate")
    outputs = {"$.output.report": Path(config.output.report)}
    if config.output.montage is not None:
        outputs["$.output.montage"] = Path(config.output.montage)
    problems = [problem for key, path in outputs.items() if (problem := _output_problem(path, key))]
    if problems:
        raise InputError("cannot write the outputs:\n  " + "\n  ".join(problems))
