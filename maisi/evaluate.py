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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args)

    def body() -> int:
        # imports torch and MONAI: after parsing, so --help stays fast
        from maisi.evaluation import inputs, ldm_run, run

        def declared_paths(config):  # the LDM evaluation ($.ldm) reads its own sets
            return (ldm_run if config.ldm is not None else inputs).declared_paths(config)

        config = load_cli_config(args, "evaluate", declared_paths)
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
