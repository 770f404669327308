"""``python -m maisi.infer``: generate CT volumes from a label mask, many masks, a description, or image-only;
or, with a plain LDM preset (``brats-2d-ldm``, ``brats-3d-ldm``, ...), unconditional 2D images or 3D volumes.

The run itself is :mod:`maisi.generation.run` (:mod:`maisi.generation.ldm_run` for LDM presets); this module
parses the command line. Many masks are shared
among processes with ``torchrun --nproc_per_node=N -m maisi.infer --config ...``. A second run into a
folder in use stops with exit code 2. Exit codes: 0 done, 2 bad input (nothing written), 1 runtime failure
(a sample that failed is counted and the others are still generated), or a sample failed the HU check under
``--strict-quality``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from maisi.cli import EXIT_OK, EXIT_RUNTIME, load_cli_config, make_parser, run_guarded, schema_int, setup_cli
from maisi.config import InferConfig, to_jsonable
from maisi.errors import InputError

PROG = "maisi.infer"
log = logging.getLogger(PROG)


def build_parser():
    parser = make_parser(
        PROG, "Generate CT volumes with a MAISI-style latent diffusion model, or images with a plain LDM."
    )
    parser.add_argument("--output-dir", help="overrides $.output.dir (relative to the working directory)")
    parser.add_argument("--seed", type=schema_int("infer", "seed"), help="overrides $.seed")
    parser.add_argument(
        "--num-samples", type=schema_int("infer", "num_samples"), help="overrides $.num_samples"
    )
    parser.add_argument(
        "--strict-quality",
        action="store_true",
        help="exit 1 when a sample failed the HU check after every try (as $.quality_check.fail_on_error)",
    )
    return parser


def apply_overrides(config: InferConfig, args: Any) -> InferConfig:
    """Command-line flags win over the file."""
    changes: dict[str, Any] = {}
    if args.output_dir is not None:
        changes["output"] = dataclasses.replace(config.output, dir=str(Path(args.output_dir).resolve()))
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.num_samples is not None:
        changes["num_samples"] = args.num_samples
    if args.device is not None:
        changes["device"] = args.device
    if args.strict_quality:
        changes["quality_check"] = dataclasses.replace(config.quality_check, fail_on_error=True)
    return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args)

    def body() -> int:
        from maisi.generation.files import check_input_files, declared_paths

        def declared(config: InferConfig) -> Any:
            """What the run reads and writes: the LDM family's files, or MAISI's."""
            if not config.is_ldm:
                return declared_paths(config)
            from maisi.generation.ldm_files import ldm_run_paths  # imports torch: after the file checks

            return ldm_run_paths(config)

        # config, files, outputs and threads first; torch and MONAI's networks are imported after
        config = load_cli_config(args, "infer", declared, apply_overrides, check_input_files)
        if config.is_ldm:
            return run_ldm(config, args)
        from maisi.generation import run as generation_run

        with generation_run.process_group(config) as ranks:  # torchrun: one process per device
            if args.dry_run:
                # Every check of a run, networks loaded strictly included, but no generation; writes nothing.
                generation_run.prepare(config, ranks)
                if ranks.is_main:
                    print(json.dumps(to_jsonable(config), indent=2))
                return EXIT_OK
            summary = generation_run.generate_all(config, ranks)
        code = summary.exit_code
        if ranks.is_main:  # one summary for the job, counted over every rank
            (log.error if code else log.warning if summary.failed else log.info)(summary.line)
        return EXIT_RUNTIME if code else EXIT_OK

    return run_guarded(PROG, body)


def run_ldm(config: InferConfig, args: Any) -> int:
    """The run of a plain LDM preset (:mod:`maisi.generation.ldm_run`), with the same process group,
    ``--dry-run`` and exit codes as CT."""
    if args.strict_quality:
        raise InputError(f"--strict-quality: the HU check is MAISI's; preset '{config.preset}' has none")
    from maisi.generation import ldm_run
    from maisi.generation import run as generation_run  # torch and MONAI: after parsing
    from maisi.generation.ldm_files import resolved_ldm_config

    with generation_run.process_group(config) as ranks:
        if args.dry_run:  # every check, networks loaded strictly included; writes nothing
            ldm_run.prepare_ldm(config, ranks)
            if ranks.is_main:
                print(json.dumps(resolved_ldm_config(config), indent=2))
            return EXIT_OK
        summary = ldm_run.generate_all_ldm(config, ranks)
    if ranks.is_main:
        (log.error if summary.exit_code else log.info)(summary.line)
    return EXIT_RUNTIME if summary.exit_code else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
