"""``python -m maisi.evaluate --config FILE``: metrics of real and synthetic CT or MR, a report and a montage.

Reconstruction PSNR / SSIM / MS-SSIM of the VAE over a real datalist, MS-SSIM diversity of the synthetic
samples (and of the real ones as reference), 2.5D FID with a local 2D ResNet (skipped, with the reason, when
no weights are given), and a PNG montage of mid-slices. Every input and output location is checked before
anything is computed. Exit codes: 0 report written, 2 bad input (missing files, report or montage paths that
cannot be written, mismatched grids, synthetic volumes too small for the diversity's MS-SSIM, fewer than 2
samples, feature-network weights of the wrong shape, malformed checkpoints, an FID over inputs mixing CT and
MR, unusable ``maisi.infer`` metadata beside a synthetic file), 1 runtime failure.

With ``$.ldm`` the same command evaluates a plain LDM's 2D images or 3D volumes (PNG / NIfTI sets):
reconstruction, diversity, memorisation, 2D / 2.5D FID and prompt adherence
(:mod:`maisi.evaluation.ldm_run`; ``docs/evaluation_ldm.md``).
"""

from __future__ import annotations

import logging
import sys

from maisi.cli import EXIT_OK, load_cli_config, make_parser, print_config, run_guarded, setup_cli

PROG = "maisi.evaluate"
log = logging.getLogger(PROG)


def build_parser():
    return make_parser(
        PROG,
        "Evaluate synthetic CT (VAE reconstruction, diversity, 2.5D FID, montage) or a plain LDM ($.ldm).",
    )


def _check_files(config) -> None:
    """What needs no network, before the heavy imports: the datalist and the weights are there, the
    datalist reads."""
    from maisi.data.datalist import read_datalist
    from maisi.files import check_files

    files = {"$.real_datalist": config.real_datalist, "$.fid.weights": config.fid.weights}
    if config.reconstruction.enabled:
        files["$.reconstruction.autoencoder"] = config.reconstruction.autoencoder
    check_files(files)
    if config.real_datalist is not None:
        read_datalist(config.real_datalist)


def _declared_paths(config):
    """What the evaluation reads and writes; the LDM evaluation ($.ldm) reads its own sets."""
    from maisi.evaluation import inputs, ldm_run  # imports torch and MONAI

    return (ldm_run if config.ldm is not None else inputs).declared_paths(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args)

    def body() -> int:
        # the config, its datalist and weights are checked before torch and MONAI's networks are imported
        config = load_cli_config(args, "evaluate", _declared_paths, check=_check_files)
        from maisi.evaluation import ldm_run, run

        if args.dry_run:
            (ldm_run if config.ldm is not None else run).prepare(config)  # every check; writes nothing
            return print_config(config)

        if config.ldm is not None:
            ldm_run.run_ldm_evaluation(config, progress=not args.no_progress)
            log.info("wrote %s", config.output.report)
            return EXIT_OK
        report = run.run_evaluation(config, progress=not args.no_progress)
        log.info(
            "wrote %s%s",
            config.output.report,
            f" and {report['montage']['path']}" if report["montage"] else "",
        )
        return EXIT_OK

    return run_guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
